"""notebooks/quickstart.ipynb, executed headless with nbclient so that it cannot rot.

The notebook's settings cell (tag `parameters`) is followed by an injected cell that switches it
to a tiny run (96-pixel shapes, the tiny model, 2 training steps) in a temporary WORKDIR; the kernel
is this interpreter (`sys.executable`), registered as a kernel spec in a temporary JUPYTER_PATH.
Checks: no cell errors; the AP dict the notebook displays holds real numbers in [0, 1] equal to
what the evaluator wrote to the workdir's metrics.json; the pictures, the Predictor and the
torchvision section produce what they say. The torchvision import with a real `.pth` (random
weights, written by torchvision here) is the slow variant.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.reference import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "mrcnn-jax-test"
TINY_STEPS = 2
TINY_VIS = 1
AP_KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")
# Per cell; the whole tiny run takes ~1-2 minutes on a loaded 2-core CPU.
CELL_TIMEOUT_S = 600


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs
               if o.output_type in ("display_data", "execute_result"))


def _kernel_spec(root: pathlib.Path) -> pathlib.Path:
    """A kernel spec running this interpreter (the venv's), with the repository importable."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mrcnn_jax tests", "language": "python",
        "env": {"PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                "CUDA_VISIBLE_DEVICES": ""},
    }))
    return root


def execute_notebook(tmp: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                     **settings) -> nbformat.NotebookNode:
    """Runs the notebook with `settings` overriding its settings cell; returns the executed one.

    nbclient raises CellExecutionError (with the cell's traceback) on the first failing cell.
    """
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _tagged(nb, "parameters")
    overrides = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    injected = nbformat.v4.new_code_cell(
        "# injected by tests/test_notebook.py\n" + overrides,
        metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(nb.cells.index(params) + 1, injected)
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp / "jupyter")))
    run_dir = tmp / "cwd"  # anything the notebook writes relative to its cwd stays in tmp
    run_dir.mkdir()
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(run_dir)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    return nb


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as monkeypatch:
        nb = execute_notebook(tmp, monkeypatch, WORKDIR=str(tmp / "work"), NUM_STEPS=TINY_STEPS,
                              TINY=True, NUM_VIS=TINY_VIS, TORCHVISION_WEIGHTS=None)
    return nb, tmp / "work"


def test_committed_notebook_has_no_outputs_and_one_settings_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        "clear the notebook's outputs before committing it"
    source = _tagged(nb, "parameters").source
    for name in ("WORKDIR", "NUM_STEPS", "TINY", "NUM_VIS", "TORCHVISION_WEIGHTS"):
        assert re.search(rf"^{name} = ", source, re.M), f"settings cell lacks {name}"


# -m slow (CI's time): the notebook's library calls run in test_demo.py and test_predict_cli.py.
@pytest.mark.slow
def test_notebook_runs_and_displays_the_evaluators_metrics(tiny_run):
    nb, workdir = tiny_run
    shown = _tagged(nb, "metrics").outputs
    results = [o for o in shown if o.output_type == "execute_result"]
    assert len(results) == 1, shown
    displayed = ast.literal_eval(results[0]["data"]["text/plain"])
    assert sorted(displayed) == sorted(AP_KEYS)
    # The evaluator of the last (and only evaluated) checkpoint wrote these files.
    step_dir = workdir / "eval" / "validation" / f"step_{TINY_STEPS}"
    written = json.loads((step_dir / "metrics.json").read_text())
    for key in AP_KEYS:
        value = displayed[key]
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, \
            (key, value)
        assert value == written[key], (key, value, written[key])
    # The training run reached its last step and left its checkpoint.
    assert (workdir / "checkpoints" / str(TINY_STEPS)).is_dir()
    assert f"step {TINY_STEPS} after" in _stdout(_tagged(nb, "train"))


# -m slow: shares the notebook run above.
@pytest.mark.slow
def test_notebook_shows_pictures_and_runs_the_predictor(tiny_run):
    nb, workdir = tiny_run
    pictures = _tagged(nb, "pictures")
    # One figure per overlay, one with the bbox and segm PR curves.
    assert f"{TINY_VIS} overlays, 2 PR curves" in _stdout(pictures)
    assert _images(pictures) == TINY_VIS + 1
    assert len(list((workdir / "eval" / "validation" / f"step_{TINY_STEPS}" / "vis")
                    .glob("*.png"))) == TINY_VIS
    predicted = _tagged(nb, "predictor")
    match = re.search(r"(\d+) detections, (\d+) scoring >=", _stdout(predicted))
    assert match, _stdout(predicted)
    # TINY keeps 10 detections per image; the threshold only filters.
    assert 0 <= int(match.group(2)) <= int(match.group(1)) <= 10
    assert _images(predicted) == 1
    assert "TORCHVISION_WEIGHTS is None: skipped" in _stdout(_tagged(nb, "torchvision"))


@pytest.mark.slow
def test_notebook_imports_a_torchvision_checkpoint(tmp_path, monkeypatch):
    # A real torchvision maskrcnn_resnet50_fpn state_dict (random weights: no download) through
    # the notebook's import + Predictor cell (~3-5 minutes on a 2-core CPU: ResNet-50 at 800 px).
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91)
    weights = tmp_path / "maskrcnn_random.pth"
    torch.save(model.state_dict(), weights)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
                    ).save(image)
    nb = execute_notebook(tmp_path, monkeypatch, WORKDIR=str(tmp_path / "work"), NUM_STEPS=1,
                          TINY=True, NUM_VIS=0, TORCHVISION_WEIGHTS=str(weights),
                          PREDICT_IMAGE=str(image))
    cell = _tagged(nb, "torchvision")
    match = re.search(r"torchvision weights: (\d+) detections in \d+s", _stdout(cell))
    assert match, _stdout(cell)
    assert 0 <= int(match.group(1)) <= 100
    assert _images(cell) == 1
