"""`train.init_from`: where a training run's weights start.

    config.model.update(init_from_overrides(config))          # before the model is built
    variables = init_from(init_variables(model, rng), config, label_map)

Two kinds of source:
- an ImageNet classifier (torchvision's `resnet50-*.pth`, ...): the ResNet body only; the FPN and
  the heads start fresh (`init_from_imagenet`).
- a detector: a torchvision Mask R-CNN / Keypoint R-CNN state_dict (`.pth`, `.safetensors`,
  `.npz`), or one of ours (a training workdir, one step of it, exported variables). Every layer
  whose shape fits loads. The class-dependent layers (box classifier and regressor, mask logits;
  keypoint logits when the keypoint count differs) start fresh when the class counts differ,
  each named in the log, unless `train.init_from_classes` maps the new classes to the
  checkpoint's: then those rows are kept. A layer of the body, the FPN or the RPN whose shape
  differs means another architecture: a ValueError naming the file and the layer (for
  torchvision's files, whose v1 or v2 layers `checkpoints/torchvision.py` reads off the keys,
  before anything loads: the FPN norm or the RPN depth differ, and the config to use).

`train.init_from_classes`: "new=old,new2=old2,name" (a name alone maps to the same name), the new
names being the run's label map names and the old ones the checkpoint's (COCO's for torchvision's
91-way weights, the run's label_map.json for ours).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mrcnn_jax.checkpoints import torchvision as tv_import
from mrcnn_jax.data.label_map import LabelMap

logger = logging.getLogger(__name__)

# Top-level modules whose leaves depend on the class count: (module, layer) -> the axis of the
# class (or keypoint) dimension in the kernel (the bias has it on its only axis) and the number
# of entries per class.
CLASS_LAYERS = {
    ("roi_box_predictor", "cls_score"): 1,
    ("roi_box_predictor", "bbox_pred"): 4,
    ("roi_mask_predictor", "mask_fcn_logits"): 1,
}
KEYPOINT_LAYERS = {("roi_keypoint_predictor", "kps_score_lowres")}
# A mismatch here is another architecture, never a new class count.
ARCHITECTURE_MODULES = ("backbone", "rpn")


@functools.lru_cache(maxsize=1)
def _state_dict(path: str) -> dict[str, np.ndarray]:
    """The file's state_dict, read once for the kind, the overrides and the weights."""
    return tv_import.load_state_dict(path)


def _is_imagenet_classifier(state_dict: Mapping[str, Any]) -> bool:
    return "fc.weight" in state_dict and "conv1.weight" in state_dict


def source_kind(path: str) -> str:
    """'imagenet', 'torchvision_detector' or 'ours' for a `train.init_from` value."""
    from mrcnn_jax import paths

    resolved = paths.resolve(path)
    if resolved.is_dir():
        return "ours"
    keys = _state_dict(str(path))
    if _is_imagenet_classifier(keys):
        return "imagenet"
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision_detector"
    raise ValueError(f"train.init_from={path!r}: neither an ImageNet classifier (conv1.*, fc.*) "
                     f"nor a detector (backbone.body.*); first keys: {list(keys)[:5]}")


def init_from_overrides(config: Any) -> dict[str, Any]:
    """The `config.model` fields the starting weights need (torchvision's v1 COCO detectors were
    trained with FrozenBN eps 0, its v2 one with BatchNorm's 1e-5; a run of ours with its own
    eps)."""
    path = config.train.init_from
    if not path:
        return {}
    kind = source_kind(path)
    if kind == "torchvision_detector":
        return tv_import.detector_config_overrides(_state_dict(str(path)))
    if kind == "ours":
        from mrcnn_jax.checkpoints import weights

        source = weights.locate(path)
        trained = source.model_config() or {}
        if "frozen_bn_eps" in trained:
            return {"frozen_bn_eps": trained["frozen_bn_eps"]}
    return {}


def init_from(variables: dict, config: Any, label_map: LabelMap | None = None) -> dict:
    """`variables` with the weights of `train.init_from` placed in (see the module docstring).
    `label_map`: the run's, for `train.init_from_classes`."""
    path = config.train.init_from
    try:
        kind = source_kind(path)
        if kind == "imagenet":
            return init_from_imagenet(variables, config)
        source, source_names = _detector_source(path, kind, config.model)
    finally:
        _state_dict.cache_clear()  # not kept for the whole run
    mapping = parse_class_mapping(config.train.get("init_from_classes", ""), label_map,
                                  source_names, path)
    return merge_detector(variables, source, mapping, path)


def _detector_source(path: str, kind: str, model_config: Any) -> tuple[dict, dict[str, int]]:
    """(the checkpoint's variables, its class name -> label)."""
    if kind == "ours":
        from mrcnn_jax.checkpoints import orbax_io, weights

        source = weights.locate(path)
        if source.kind == weights.TRAINING:
            variables = source.restore_variables()
        else:
            variables = orbax_io.restore_variables(source.path)
        labels = source.label_map()
        names = {} if labels is None else {n: label for label, n in labels.label_names.items()}
        return jax.tree_util.tree_map(np.asarray, variables), names
    state_dict = _state_dict(str(path))
    # (Pre-v2 key names read as v1's layers.) A head of another layout starts fresh below.
    arch = tv_import.architecture_of(state_dict)
    if any(arch[k] != model_config.get(k) for k in ("fpn_norm", "rpn_conv_depth")):
        raise ValueError(f"train.init_from={path!r}: a checkpoint of another architecture: "
                         f"{tv_import.architecture_hint(state_dict, model_config)}")
    variables = tv_import.convert_detector(state_dict, model_config)
    from mrcnn_jax.data.coco2017 import COCO_CATEGORY_NAMES

    num_classes = np.shape(state_dict["roi_heads.box_predictor.cls_score.weight"])[0]
    names = ({n: c for c, n in COCO_CATEGORY_NAMES.items() if c}
             if num_classes == 91 else {})
    return variables, names


def parse_class_mapping(spec: str, label_map: LabelMap | None, source_names: Mapping[str, int],
                        path: str) -> dict[int, int]:
    """`train.init_from_classes` -> {new label: checkpoint label}, background (0 -> 0) included
    when any class is mapped. Raises ValueError naming an unknown class."""
    if not spec:
        return {}
    if label_map is None:
        raise ValueError("train.init_from_classes needs the run's label map (the data)")
    new_names = {name: label for label, name in label_map.label_names.items()}
    mapping = {0: 0}
    for item in spec.split(","):
        new, _, old = item.strip().partition("=")
        new, old = new.strip(), (old.strip() or new.strip())
        if new not in new_names:
            raise ValueError(f"train.init_from_classes: {new!r} is not a class of the data "
                             f"({sorted(new_names)})")
        if old not in source_names:
            raise ValueError(f"train.init_from_classes: {old!r} is not a class of {path} "
                             f"({sorted(source_names) or 'its class names are unknown'})")
        mapping[new_names[new]] = source_names[old]
    return mapping


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _class_rows(source: np.ndarray, fresh: np.ndarray, mapping: Mapping[int, int],
                per_class: int) -> np.ndarray:
    """`fresh` with the rows of each mapped class taken from `source` (the class axis is last)."""
    out = np.array(fresh, copy=True)
    for new, old in mapping.items():
        out[..., new * per_class:(new + 1) * per_class] = \
            source[..., old * per_class:(old + 1) * per_class]
    return out


def merge_detector(variables: dict, source: Mapping[str, Any], mapping: Mapping[int, int],
                   path: str) -> dict:
    """Place `source` (a detector's variables) into `variables` (see the module docstring)."""
    target = _flatten(variables)
    given = _flatten(source)
    out = dict(target)
    loaded, fresh, remapped = 0, [], []
    for key, value in target.items():
        layer = tuple(k for k in key[1:3])
        where = "/".join(key)
        if key not in given:
            fresh.append(where)
            continue
        got = np.asarray(given[key])
        if got.shape == tuple(value.shape):
            if layer in CLASS_LAYERS and mapping:
                # Same class count, but a mapping asks for other rows: honour it.
                out[key] = _class_rows(got, np.asarray(value), mapping, CLASS_LAYERS[layer])
                remapped.append(where)
            else:
                out[key] = got.astype(np.asarray(value).dtype)
                loaded += 1
            continue
        if layer in CLASS_LAYERS:
            if mapping:
                out[key] = _class_rows(got, np.asarray(value), mapping, CLASS_LAYERS[layer])
                remapped.append(f"{where} {got.shape} -> {tuple(value.shape)}")
            else:
                fresh.append(f"{where} ({got.shape} in the checkpoint, {tuple(value.shape)} "
                             f"here: another class count)")
            continue
        if layer in KEYPOINT_LAYERS:
            fresh.append(f"{where} ({got.shape} in the checkpoint, {tuple(value.shape)} here: "
                         f"another keypoint count)")
            continue
        raise ValueError(f"train.init_from={path!r}: {where} is {got.shape} in the checkpoint "
                         f"but {tuple(value.shape)} here: a checkpoint of another architecture")
    extra = sorted("/".join(k) for k in given if k not in target)
    wrong = [k for k in extra if k.split("/")[1] in ARCHITECTURE_MODULES]
    if wrong:
        raise ValueError(f"train.init_from={path!r}: the checkpoint has {wrong[0]}, which this "
                         f"model lacks ({len(wrong)} such): a checkpoint of another architecture")
    logger.info("init_from %s: %d arrays loaded", path, loaded)
    for where in remapped:
        logger.warning("init_from: %s: rows of the mapped classes kept, the others fresh", where)
    for where in fresh:
        logger.warning("init_from: %s starts fresh", where)
    if extra:
        logger.warning("init_from: %d arrays of the checkpoint unused (this model has no %s)",
                       len(extra), ", ".join(sorted({k.split("/")[1] for k in extra})))
    nested: dict = {}
    for key, value in out.items():
        node = nested
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return nested


def init_from_imagenet(variables: dict, config: Any) -> dict:
    """Replace the ResNet body with torchvision ImageNet weights (`train.init_from`).

    FPN: the whole classifier body (conv1..layer4) goes to `backbone/body`. C4: conv1..layer3 go
    to `backbone/body` and layer4 to the res5 box head (`roi_box_head/layer4`), as detectron2's
    R50-C4 does. Every replaced subtree must have the model's shapes (else a ValueError naming it).
    """
    imported = tv_import.import_resnet(_state_dict(str(config.train.init_from)), config.model)
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


__all__ = ["CLASS_LAYERS", "init_from", "init_from_imagenet", "init_from_overrides",
           "merge_detector", "parse_class_mapping", "source_kind"]
