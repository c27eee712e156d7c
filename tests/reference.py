"""Where the torchvision reference arrays live, and pytest params over them."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def reference_dir() -> pathlib.Path:
    """Directory of torchvision reference arrays (`MRCNN_REFERENCE_DIR`, default ../shared/reference)."""
    return pathlib.Path(os.environ.get("MRCNN_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def reference_files(pattern: str) -> list[pathlib.Path]:
    """All reference files matching `pattern` (e.g. 'nms_seed*.npz'); empty when the directory is absent."""
    root = reference_dir()
    return sorted(root.glob(pattern)) if root.is_dir() else []


def reference_params(pattern: str):
    """pytest params over reference files, with the file name as the test id; a skip when none exist."""
    files = reference_files(pattern)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {reference_dir()}"))]
    return [pytest.param(f, id=f.name) for f in files]
