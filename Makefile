# Two commands on a fresh machine: `make demo` and `make test`.
# Both build .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# WITH_PARITY=1 also installs torch/torchvision for the live parity tests (CI sets it).
WITH_PARITY ?= 0
DEMO_DIR ?= workdir_demo

.PHONY: venv test demo bench clean

$(VENV)/.core: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.parity: $(VENV)/.core requirements-parity.txt
	$(PY) -m pip install -q -r requirements-parity.txt
	touch $@

ifeq ($(WITH_PARITY),1)
venv: $(VENV)/.parity
else
venv: $(VENV)/.core
endif

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m mrcnn_jax.demo --workdir=$(DEMO_DIR)

bench: venv
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
