# Two commands on a fresh machine: `make demo` and `make test`.
# Both build .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# WITH_PARITY=1 also installs torch/torchvision for the live parity tests (CI sets it).
WITH_PARITY ?= 0
DEMO_DIR ?= workdir_demo
# glibc's malloc maps the large per-step buffers of XLA:CPU (and torch) afresh every step; with
# transparent huge pages their first touches take ~400x fewer page faults (the CPU R50-FPN train
# step: 1.2 million -> 3 thousand, 0.8x the time; docs/cpu_performance.md). glibc >= 2.35 and the
# kernel's THP mode "madvise" or "always"; ignored elsewhere. A GLIBC_TUNABLES of your own wins.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export GLIBC_TUNABLES

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

# Two workers, each taking whole test files (module fixtures are built once).
test: venv
	$(PY) -m pytest -n 2 --dist loadfile

demo: venv
	$(PY) -m mrcnn_jax.demo --workdir=$(DEMO_DIR)

bench: venv
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
