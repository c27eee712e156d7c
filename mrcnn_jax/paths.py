"""Paths that may be local or in a bucket (gs://, s3://, ...): the run's one place for file IO.

A training job on a TPU pod keeps its workdir, TFDS data, weights and COCO annotations in a
bucket: the VMs' disks disappear with a preemption. `os.path` and `open` would take
"gs://bucket/run" for a relative local folder named "gs:" and write the checkpoints there, to be
lost with the VM. Every file the trainer and the evaluator read or write therefore goes through
`etils.epath` (TensorFlow's gfile for URLs, the OS for local files), the path library orbax
itself uses, via the helpers below.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for "scheme://..." paths (gs://, s3://, ...), False for local ones."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a local one made absolute, a URL as it is."""
    path = os.fspath(path)
    return epath.Path(path if is_url(path) else os.path.abspath(path))


def makedirs(path: PathLike) -> epath.Path:
    """Creates the folder `path` with its parents (no error when it exists); returns it."""
    folder = resolve(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_json(path: PathLike) -> Any:
    """The parsed json file `path` (FileNotFoundError / ValueError name the file)."""
    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"json file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 1) -> None:
    """Writes `obj` as json to `path` via a temporary file renamed over it, so a reader (or a
    killed job) never sees half a file (on object stores the rename is a copy: still all or
    nothing for readers of `path`)."""
    path = resolve(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    tmp.replace(path)


def check_orbax_directory(path: PathLike) -> None:
    """Fails early, naming the path, when orbax cannot use the checkpoint folder `path`: for a
    gs:// bucket orbax asks the bucket's layout through the google-cloud-storage client (not one
    of orbax's own dependencies; `pip install -e .[gcs]`), and without it the first save or
    listing raises an ImportError deep inside orbax."""
    if os.fspath(path).startswith("gs://") and _find_spec("google.cloud.storage") is None:
        raise ImportError(f"checkpoints in {os.fspath(path)}: orbax needs the "
                          "google-cloud-storage package for gs:// buckets "
                          "(pip install google-cloud-storage, or pip install -e '.[gcs]')")


def _find_spec(module: str) -> Any:
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a missing parent package (google, google.cloud)
        return None
