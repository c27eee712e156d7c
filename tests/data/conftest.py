"""Fixtures of the data tests: a tiny shapes set, its tfds copy and config (built once)."""

import logging

import pytest

# torch's compiler stack (imported by torchvision.ops) segfaults when it is loaded after
# TensorFlow in the same process; load it first when the optional parity extra is installed.
try:
    import torch  # noqa: F401
    import torchvision.ops  # noqa: F401
except ImportError:
    pass

from configs import shapes as shapes_config
from mrcnn_jax.data import coco_instances, shapes

# tfds prints a custom-config warning and progress bars for every build; keep the logs readable.
logging.getLogger("absl").setLevel(logging.ERROR)

SHAPES_SIZE = 96
SHAPES_TRAIN = 10
SHAPES_VAL = 5


def small_shapes_config(root, size=SHAPES_SIZE, num_train=SHAPES_TRAIN, num_val=SHAPES_VAL):
    """configs/shapes.py at a small size and count, data under `root`."""
    c = shapes_config.get_config(f"root={root}")
    c.data.shapes.update(num_train=num_train, num_val=num_val, size=size, seed=0)
    c.data.min_size = c.data.max_size = size
    c.data.canvas_size = (size, size)
    c.data.raw_canvas_size = (size, int(round(size * max(shapes.ASPECT_RATIOS))))
    c.data.gt_mask_size = 32
    c.data.num_parallel_calls = 1  # 2 shared cores: parallel maps only add contention here
    c.data.prefetch = 1
    c.train.global_batch_size = 2
    c.eval.batch_size = 2
    return c


@pytest.fixture(scope="session")
def shapes_cfg(tmp_path_factory):
    return small_shapes_config(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shapes_builder(shapes_cfg):
    return coco_instances.get_builder(shapes_cfg.data)
