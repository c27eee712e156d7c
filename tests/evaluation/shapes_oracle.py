"""A tiny synthetic shapes split and an oracle for the model, shared by the evaluation tests.

The oracle answers each eval batch with its own ground truth (the pipeline's gt boxes in resized
pixels, its cropped gt masks resampled to 28x28), so the whole path data -> canvas detections ->
original pixels -> category ids -> COCOeval has known numbers to reach: bbox AP = 1.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from mrcnn_jax.ops.bilinear import resize_bilinear
from tests.reference import REPO_ROOT

MASK_SIZE = 28


def shapes_config(root, num_val=5):
    """configs/shapes.py with a 2-image train split, `num_val` val images, eval batches of 2."""
    spec = importlib.util.spec_from_file_location("shapes_config",
                                                  REPO_ROOT / "configs" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"root={root}")
    config.data.shapes.num_train = 2
    config.data.shapes.num_val = num_val
    config.eval.batch_size = 2
    return config


def oracle(config, builder):
    """predict_fn answering each eval batch with its own ground truth (looked up by the image
    bytes). Variables {"drop": k} leave out the first k instances of every image."""
    from mrcnn_jax.data import input_pipeline

    answers = {}
    for batch in input_pipeline.make_eval_iterator(config, builder=builder):
        b, m = batch["gt_classes"].shape
        probs = np.zeros((b, m, MASK_SIZE, MASK_SIZE), np.float32)
        for i in range(b):
            for j in np.flatnonzero(batch["gt_valid"][i]):
                probs[i, j] = resize_bilinear(batch["gt_masks"][i, j].astype(np.float32),
                                              (MASK_SIZE, MASK_SIZE))
        answers[batch["image"].tobytes()] = {
            "boxes": batch["gt_mask_boxes"], "scores": np.ones((b, m), np.float32),
            "labels": batch["gt_classes"], "valid": batch["gt_valid"], "mask_probs": probs}

    def predict(variables, images, image_sizes):
        out = dict(answers[np.asarray(images).tobytes()])
        drop = (variables or {}).get("drop", 0)
        out["valid"] = out["valid"] & (np.arange(out["valid"].shape[1]) >= drop)
        return out

    return predict
