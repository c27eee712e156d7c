"""`train.init_from`: a fresh model's ResNet body from torchvision ImageNet weights.

    variables = init_from_imagenet(init_variables(model, rng), config)

The weights are read by `checkpoints.torchvision.import_resnet`; this module places them in the
detector's variable tree, the one step that knows both the classifier's and the detector's layout.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from mrcnn_jax.checkpoints import torchvision as tv_import

logger = logging.getLogger(__name__)


def init_from_imagenet(variables: dict, config: Any) -> dict:
    """Replace the ResNet body with torchvision ImageNet weights (`train.init_from`).

    FPN: the whole classifier body (conv1..layer4) goes to `backbone/body`. C4: conv1..layer3 go
    to `backbone/body` and layer4 to the res5 box head (`roi_box_head/layer4`), as detectron2's
    R50-C4 does. Every replaced subtree must have the model's shapes (else a ValueError naming it).
    """
    imported = tv_import.import_resnet(config.train.init_from, config.model)
    variables = jax.tree_util.tree_map(lambda x: x, variables)  # a copy to edit
    for collection, source in imported.items():
        if collection not in variables:
            continue
        body = variables[collection]["backbone"]["body"]
        # (destination subtree, its name in the torchvision body)
        routes = [(body, name) for name in list(body)]
        if config.model.architecture == "c4":
            routes.append((variables[collection]["roi_box_head"], "layer4"))
        for destination, name in routes:
            expected = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), destination[name])
            got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), source.get(name))
            if expected != got:
                raise ValueError(f"train.init_from={config.train.init_from!r}: {collection}/"
                                 f"{name} does not fit model.backbone={config.model.backbone!r}")
            destination[name] = source[name]
    logger.info("backbone body initialised from %s", config.train.init_from)
    return variables
