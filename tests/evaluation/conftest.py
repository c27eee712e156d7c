"""The tiny shapes split of the evaluation tests, generated once per test session."""

from __future__ import annotations

import pytest

from tests.evaluation.shapes_oracle import shapes_config


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """(config, prepared tfds builder) of a 5-image shapes val split."""
    from mrcnn_jax.data import coco_instances

    config = shapes_config(tmp_path_factory.mktemp("shapes"))
    return config, coco_instances.get_builder(config.data)
