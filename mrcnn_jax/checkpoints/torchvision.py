"""Import torchvision state_dicts (`.pth`, `.safetensors`, `.npz`) into our flax variables.

What can be imported:
  * `import_resnet`: an ImageNet classifier (`resnet50`, `resnet101`, `resnext101_32x8d`) into
    a bare `ResNet` (the training init); its `fc.*` classifier is read and deliberately dropped.
  * `import_resnet_fpn`: the `backbone.body.*` / `backbone.fpn.*` keys of a detection model into
    a `ResNetFPN`.
  * `import_maskrcnn`: a whole `maskrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn_v2` state_dict
    (or any head combination the config switches on: `mask_head`, `keypoint_head`) into
    `MaskRCNN` variables, plus the model-config overrides it needs (`frozen_bn_eps = 0.0` for
    v1: torchvision's COCO builder overwrites FrozenBatchNorm's eps with 0, and the weights were
    trained so; v2's builder keeps BatchNorm2d's 1e-5). The config picks the entries: v2 weights
    need v2's architecture (configs/fpn_r50_v2.py), and a mismatch fails naming the first key at
    fault and the config to use.
  * `import_keypointrcnn`: a `keypointrcnn_resnet50_fpn` state_dict (`roi_heads.keypoint_head.*`,
    `roi_heads.keypoint_predictor.*`, no mask branch).

The name map is explicit and total. Each table function below lists one `Entry` per torchvision
key: (torch key, our variable path starting with the collection, conversion kind). `convert`
then insists that every key of the state_dict is consumed by an entry, that every required entry
finds its key, that every shape matches the model's own variables, and that no model variable is
left without a key; each failure is a `ValueError` that names the key.

Conversions (torch -> flax): conv OIHW -> HWIO (grouped convs alike: (O, I/g, kh, kw) ->
(kh, kw, I/g, O)); Linear (out, in) -> (in, out); ConvTranspose2d (in, out, kh, kw) -> flax
`nn.ConvTranspose(transpose_kernel=False)` kernel (kh, kw, in, out) with both spatial axes
flipped (torch's transposed conv is the gradient of a conv, flax's default is not flipped);
FrozenBatchNorm `weight/bias/running_mean/running_var` -> `batch_stats` `scale/bias/mean/var`
(BatchNorm2d alike, its `num_batches_tracked` dropped).

torchvision v1 and v2 (`maskrcnn_resnet50_fpn_v2`) differ only in layers the config switches
(`architecture_of` reads them off a state_dict):
    fpn_norm "" | "frozen_bn"    `backbone.fpn.{inner,layer}_blocks.{i}.0` conv (with a bias |
                                 without) + `.1` BatchNorm -> fpn/{block}_{i}, fpn/{block}_{i}_norm
    rpn_conv_depth 1 | 2         `rpn.head.conv.{i}.0` -> rpn/conv, rpn/conv2
    box_head "2fc" | "4conv1fc"  `roi_heads.box_head.fc6/fc7` | FastRCNNConvFCHead's Sequential:
                                 `{i}.0` conv + `{i}.1` BatchNorm (i < 4), `4` Flatten, `5` Linear
                                 -> roi_box_head/conv{i+1}, conv{i+1}_norm, fc1
    head_norm "" | "frozen_bn"   `roi_heads.mask_head.{i}.1` BatchNorm -> mask_fcn{i+1}_norm (and
                                 the box head's above)

For the heads engineer: fill `heads_entries(model_config)` with the `rpn.*` and `roi_heads.*`
entries, using the helpers `_conv`, `_linear`, `_conv_transpose` (e.g.
`_conv("rpn.head.conv.0.0", ("rpn", "conv"))` yields both `.weight` and `.bias` entries;
paths are relative to `params`). `import_maskrcnn` picks them up with no other change; the
backbone sits under our `backbone` module (`MaskRCNN` must name its `ResNetFPN` "backbone").
"""

from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from etils import epath

from mrcnn_jax import paths
from mrcnn_jax.modeling.norm import FROZEN_COLLECTION, TORCH_NORM_EPS

StateDict = Mapping[str, np.ndarray]
PathLike = str | os.PathLike

# What torchvision's COCO Mask R-CNN checkpoint needs from `config.model` (see module docstring).
MASKRCNN_CONFIG_OVERRIDES = {"frozen_bn_eps": 0.0}
# The same for maskrcnn_resnet50_fpn_v2's: BatchNorm2d's own eps (its builder keeps it).
MASKRCNN_V2_CONFIG_OVERRIDES = {"frozen_bn_eps": TORCH_NORM_EPS}
# The `config.model` fields in which torchvision's v1 and v2 Mask R-CNN differ (`architecture_of`).
ARCHITECTURE_FIELDS = ("fpn_norm", "head_norm", "box_head", "rpn_conv_depth")
# torchvision's keypointrcnn_resnet50_fpn architecture on top of base_config().model.
KEYPOINTRCNN_CONFIG_OVERRIDES = {"num_classes": 2, "mask_head": False, "keypoint_head": True}

# Conversion kinds.
CONV = "conv"  # OIHW -> HWIO
LINEAR = "linear"  # (out, in) -> (in, out)
CONV_TRANSPOSE = "conv_transpose"  # (in, out, kh, kw) -> (kh, kw, in, out), spatially flipped
VECTOR = "vector"  # 1-D, unchanged
IGNORE = "ignore"  # read and deliberately dropped (ImageNet fc, BN num_batches_tracked)

_KIND_NDIM = {CONV: 4, LINEAR: 2, CONV_TRANSPOSE: 4, VECTOR: 1}


class Entry(NamedTuple):
    """One torchvision key: where it goes (collection first) and how it is converted."""

    torch_key: str
    path: tuple[str, ...]
    kind: str
    optional: bool = False  # a missing key is not an error (only for IGNORE entries)


# --- Reading and writing state_dict files ----------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # BF16 is read as uint16 and widened to float32 (numpy has no bfloat16).


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a state_dict as {key: numpy array} from `.pth`/`.pt` (needs torch), `.safetensors`
    or `.npz`. A `.pth` holding {"model": state_dict} (torchvision's reference training
    scripts) is unwrapped. `path` may be local or a bucket URL (gs://...)."""
    path = paths.resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        return _load_pth(path)
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # zipfile/np errors: say which file is bad.
            raise ValueError(f"{path}: not a readable .npz state_dict ({e})") from e
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .pth, .pt, "
                     f".safetensors or .npz")


def _load_pth(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading .pth files needs torch (pip install -r requirements-parity.txt); "
            f"or convert it once where torch is installed, e.g. with "
            f"mrcnn_jax.checkpoints.torchvision.save_safetensors(state_dict, 'x.safetensors')"
        ) from e
    try:
        obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of tensors), got "
                         f"{type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: key {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v.numpy()
    return out


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Parse a `.safetensors` file with numpy: u64 header length, JSON header, raw bytes."""
    path = paths.resolve(path)
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except Exception as e:
        raise ValueError(f"{path}: not a .safetensors file (bad header: {e})") from e
    body = memoryview(data)[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if end > len(body) or begin > end:
            raise ValueError(f"{path}: key {key!r} points outside the file (truncated?)")
        raw = body[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: key {key!r} has unsupported dtype {dtype}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: key {key!r} holds {arr.size} values, shape {shape}")
        out[key] = arr.reshape(shape).astype(arr.dtype.newbyteorder("="))
    return out


def save_safetensors(state_dict: StateDict, path: PathLike) -> None:
    """Write {key: array} as `.safetensors` (readable by `read_safetensors` and the
    `safetensors` package), e.g. to convert a `.pth` once on a machine with torch."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for key in sorted(state_dict):
        arr = np.asarray(state_dict[key], order="C")  # ascontiguousarray would make 0-d 1-d
        if arr.dtype not in names:
            raise ValueError(f"state_dict: key {key!r} has unsupported dtype {arr.dtype}")
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with paths.resolve(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for raw in chunks:
            f.write(raw)


def save_npz(state_dict: StateDict, path: PathLike) -> None:
    """Write {key: array} as an uncompressed `.npz`."""
    np.savez(path, **{k: np.asarray(v) for k, v in state_dict.items()})


# --- Name tables -----------------------------------------------------------------------------

def _conv(torch_name: str, path: tuple[str, ...], bias: bool = True) -> list[Entry]:
    out = [Entry(f"{torch_name}.weight", ("params", *path, "kernel"), CONV)]
    if bias:
        out.append(Entry(f"{torch_name}.bias", ("params", *path, "bias"), VECTOR))
    return out


def _linear(torch_name: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{torch_name}.weight", ("params", *path, "kernel"), LINEAR),
            Entry(f"{torch_name}.bias", ("params", *path, "bias"), VECTOR)]


def _conv_transpose(torch_name: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{torch_name}.weight", ("params", *path, "kernel"), CONV_TRANSPOSE),
            Entry(f"{torch_name}.bias", ("params", *path, "bias"), VECTOR)]


def _norm(torch_name: str, path: tuple[str, ...], norm: str) -> list[Entry]:
    if norm == "frozen_bn":
        c = FROZEN_COLLECTION
        return [
            Entry(f"{torch_name}.weight", (c, *path, "scale"), VECTOR),
            Entry(f"{torch_name}.bias", (c, *path, "bias"), VECTOR),
            Entry(f"{torch_name}.running_mean", (c, *path, "mean"), VECTOR),
            Entry(f"{torch_name}.running_var", (c, *path, "var"), VECTOR),
            # nn.BatchNorm2d checkpoints (ImageNet) carry a step counter FrozenBN drops too.
            Entry(f"{torch_name}.num_batches_tracked", (), IGNORE, optional=True),
        ]
    if norm == "group_norm":
        return [Entry(f"{torch_name}.weight", ("params", *path, "scale"), VECTOR),
                Entry(f"{torch_name}.bias", ("params", *path, "bias"), VECTOR)]
    raise ValueError(f"norm: unknown normalisation {norm!r}")


def _conv_norm(torch_name: str, path: tuple[str, ...], norm: str) -> list[Entry]:
    """torchvision's `Conv2dNormActivation`: conv `.0` (with a bias only without a norm) and
    norm `.1` -> our `path` and `path` + "_norm" (the activation has no weights)."""
    out = _conv(f"{torch_name}.0", path, bias=not norm)
    if norm:
        out += _norm(f"{torch_name}.1", (*path[:-1], f"{path[-1]}_norm"), norm)
    return out


def resnet_entries(stage_sizes: Sequence[int], norm: str = "frozen_bn", torch_prefix: str = "",
                   path_prefix: tuple[str, ...] = ()) -> list[Entry]:
    """torchvision ResNet body keys (`conv1`, `bn1`, `layer{i}.{j}.*`) -> our `ResNet` paths.

    Every block has conv1..3/bn1..3; block 0 of every stage has `downsample.0` (conv) and
    `downsample.1` (norm) since its stride or width changes.
    """
    t, p = torch_prefix, path_prefix
    out = _conv(f"{t}conv1", (*p, "conv1"), bias=False) + _norm(f"{t}bn1", (*p, "bn1"), norm)
    for i, n in enumerate(stage_sizes):
        for j in range(n):
            tb, pb = f"{t}layer{i + 1}.{j}", (*p, f"layer{i + 1}", f"block{j}")
            for k in (1, 2, 3):
                out += _conv(f"{tb}.conv{k}", (*pb, f"conv{k}"), bias=False)
                out += _norm(f"{tb}.bn{k}", (*pb, f"bn{k}"), norm)
            if j == 0:
                out += _conv(f"{tb}.downsample.0", (*pb, "downsample_conv"), bias=False)
                out += _norm(f"{tb}.downsample.1", (*pb, "downsample_bn"), norm)
    return out


def imagenet_classifier_entries(torch_prefix: str = "") -> list[Entry]:
    """The ImageNet `fc` layer: read and dropped (a detector has no use for it)."""
    return [Entry(f"{torch_prefix}fc.weight", (), IGNORE, optional=True),
            Entry(f"{torch_prefix}fc.bias", (), IGNORE, optional=True)]


def fpn_entries(num_levels: int = 4, torch_prefix: str = "backbone.fpn.",
                path_prefix: tuple[str, ...] = ("backbone", "fpn"), norm: str = "") -> list[Entry]:
    """torchvision FPN keys (`inner_blocks.{i}.0`, `layer_blocks.{i}.0`, and with `norm`
    (`model.fpn_norm`, v2: BatchNorm) `.{i}.1`) -> our `FPN` paths."""
    out = []
    for block in ("inner_blocks", "layer_blocks"):
        for i in range(num_levels):
            out += _conv_norm(f"{torch_prefix}{block}.{i}", (*path_prefix, f"{block}_{i}"), norm)
    return out


def heads_entries(model_config: Any) -> list[Entry]:
    """`rpn.*` and `roi_heads.*` keys -> our MaskRCNN head paths (modeling/mask_rcnn.py).

    rpn.head.conv.{i}.0 / cls_logits / bbox_pred -> rpn/{conv, conv2.., cls_logits, bbox_pred};
    the box head (`box_head_entries`); roi_heads.box_predictor.* -> roi_box_predictor;
    roi_heads.mask_head.{i}.0 (+ .1 with `head_norm`) -> roi_mask_head/mask_fcn{i+1} (+ _norm);
    roi_heads.mask_predictor.conv5_mask (ConvTranspose) and mask_fcn_logits ->
    roi_mask_predictor. Pre-v2 key names: see `upgrade_legacy_head_keys`.
    """
    head_norm = model_config.get("head_norm", "")
    out = []
    for i in range(model_config.get("rpn_conv_depth", 1)):
        out += _conv(f"rpn.head.conv.{i}.0", ("rpn", "conv" if i == 0 else f"conv{i + 1}"))
    out += _conv("rpn.head.cls_logits", ("rpn", "cls_logits"))
    out += _conv("rpn.head.bbox_pred", ("rpn", "bbox_pred"))
    out += box_head_entries(model_config)
    for fc in ("cls_score", "bbox_pred"):
        out += _linear(f"roi_heads.box_predictor.{fc}", ("roi_box_predictor", fc))
    if model_config.get("mask_head", True):
        for i in range(len(model_config.mask_head_layers)):
            out += _conv_norm(f"roi_heads.mask_head.{i}", ("roi_mask_head", f"mask_fcn{i + 1}"),
                              head_norm)
        out += _conv_transpose("roi_heads.mask_predictor.conv5_mask",
                               ("roi_mask_predictor", "conv5_mask"))
        out += _conv("roi_heads.mask_predictor.mask_fcn_logits",
                     ("roi_mask_predictor", "mask_fcn_logits"))
    if model_config.get("keypoint_head", False):
        out += keypoint_entries(model_config)
    return out


def box_head_entries(model_config: Any) -> list[Entry]:
    """`roi_heads.box_head.*` -> roi_box_head. "2fc": TwoMLPHead's fc6/fc7 (fc6 flattens in
    torch's (c, h, w) order, as ours does, so a plain transpose). "4conv1fc": torchvision's
    `FastRCNNConvFCHead`, a Sequential of n conv blocks `{i}.0` (+ `{i}.1` norm), Flatten at n and
    the Linear at n + 1 -> conv{i+1} (+ conv{i+1}_norm) and fc1."""
    if model_config.get("box_head", "2fc") == "2fc":
        return [e for fc in ("fc6", "fc7")
                for e in _linear(f"roi_heads.box_head.{fc}", ("roi_box_head", fc))]
    n = len(model_config.box_head_conv_dims)
    out = []
    for i in range(n):
        out += _conv_norm(f"roi_heads.box_head.{i}", ("roi_box_head", f"conv{i + 1}"),
                          model_config.get("head_norm", ""))
    return out + _linear(f"roi_heads.box_head.{n + 1}", ("roi_box_head", "fc1"))


def keypoint_entries(model_config: Any) -> list[Entry]:
    """`roi_heads.keypoint_head.*` / `keypoint_predictor.*` (keypointrcnn_resnet50_fpn) -> our
    roi_keypoint_head/conv_fcn{i+1} and roi_keypoint_predictor/kps_score_lowres. torch's
    KeypointRCNNHeads is a Sequential of (conv, ReLU) pairs, so conv i is module 2 i."""
    out = []
    for i in range(len(model_config.keypoint_head_layers)):
        out += _conv(f"roi_heads.keypoint_head.{2 * i}", ("roi_keypoint_head", f"conv_fcn{i + 1}"))
    out += _conv_transpose("roi_heads.keypoint_predictor.kps_score_lowres",
                           ("roi_keypoint_predictor", "kps_score_lowres"))
    return out


def upgrade_legacy_head_keys(state_dict: StateDict, num_mask_layers: int = 4
                             ) -> dict[str, np.ndarray]:
    """Rename pre-v2 head keys as torchvision's `_load_from_state_dict` does (its COCO weights
    file uses them): `rpn.head.conv.{w,b}` -> `rpn.head.conv.0.0.{w,b}` and
    `roi_heads.mask_head.mask_fcn{i}.{w,b}` -> `roi_heads.mask_head.{i-1}.0.{w,b}`."""
    renames = {"rpn.head.conv": "rpn.head.conv.0.0"}
    for i in range(num_mask_layers):
        renames[f"roi_heads.mask_head.mask_fcn{i + 1}"] = f"roi_heads.mask_head.{i}.0"
    out = dict(state_dict)
    for old_prefix, new_prefix in renames.items():
        for kind in ("weight", "bias"):
            old, new = f"{old_prefix}.{kind}", f"{new_prefix}.{kind}"
            if old in out:
                if new in out:
                    raise ValueError(f"state_dict: has both {old!r} and {new!r}")
                out[new] = out.pop(old)
    return out


def upgrade_legacy_fpn_keys(state_dict: StateDict, torch_prefix: str = "backbone.fpn.",
                            num_levels: int = 4) -> dict[str, np.ndarray]:
    """Rename pre-v2 FPN keys `{inner,layer}_blocks.{i}.{weight,bias}` to `...{i}.0.{...}`, as
    torchvision's FPN does when loading old checkpoints (its COCO weights file uses them)."""
    out = dict(state_dict)
    for block in ("inner_blocks", "layer_blocks"):
        for i in range(num_levels):
            for kind in ("weight", "bias"):
                old = f"{torch_prefix}{block}.{i}.{kind}"
                if old in out:
                    new = f"{torch_prefix}{block}.{i}.0.{kind}"
                    if new in out:
                        raise ValueError(f"state_dict: has both {old!r} and {new!r}")
                    out[new] = out.pop(old)
    return out


# --- Conversion ------------------------------------------------------------------------------

def _convert_array(entry: Entry, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    want = _KIND_NDIM[entry.kind]
    if value.ndim != want:
        raise ValueError(f"state_dict[{entry.torch_key!r}]: expected a {want}-D {entry.kind} "
                         f"weight, got shape {value.shape}")
    if np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float32)
    if entry.kind == CONV:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if entry.kind == LINEAR:
        return np.ascontiguousarray(value.T)
    if entry.kind == CONV_TRANSPOSE:
        return np.ascontiguousarray(value.transpose(2, 3, 0, 1)[::-1, ::-1])
    return value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[tuple(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def convert(state_dict: StateDict, entries: Iterable[Entry], target: Any = None) -> dict:
    """Apply a total name map: {torch key: array} -> nested variables {collection: {...}}.

    `target`: the model's variables or their abstract shapes (`jax.eval_shape(model.init, ...)`);
    when given, every converted shape must match and every target leaf must be provided.
    Raises ValueError naming the key for unknown keys, missing keys, wrong ranks or shapes.
    """
    entries = list(entries)
    by_key: dict[str, Entry] = {}
    for e in entries:
        if e.torch_key in by_key:
            raise ValueError(f"name map: torch key {e.torch_key!r} listed twice")
        by_key[e.torch_key] = e
    unknown = [k for k in state_dict if k not in by_key]
    if unknown:
        raise ValueError(f"state_dict: {len(unknown)} unknown key(s), first {unknown[0]!r} "
                         f"(all: {unknown[:10]}{' ...' if len(unknown) > 10 else ''})")
    missing = [e.torch_key for e in entries if not e.optional and e.torch_key not in state_dict]
    if missing:
        raise ValueError(f"state_dict: {len(missing)} missing key(s), first {missing[0]!r} "
                         f"(all: {missing[:10]}{' ...' if len(missing) > 10 else ''})")
    flat_target = _flatten(target) if target is not None else None
    variables: dict = {}
    seen: dict[tuple[str, ...], str] = {}
    for e in entries:
        if e.kind == IGNORE or e.torch_key not in state_dict:
            continue
        if e.path in seen:
            raise ValueError(f"name map: {e.torch_key!r} and {seen[e.path]!r} both go to "
                             f"{'/'.join(e.path)}")
        seen[e.path] = e.torch_key
        torch_shape = tuple(np.shape(state_dict[e.torch_key]))
        value = _convert_array(e, state_dict[e.torch_key])
        if flat_target is not None:
            if e.path not in flat_target:
                raise ValueError(f"state_dict[{e.torch_key!r}]: the model has no variable "
                                 f"{'/'.join(e.path)}")
            want = tuple(flat_target[e.path].shape)
            if value.shape != want:
                raise ValueError(f"state_dict[{e.torch_key!r}]: shape {torch_shape} "
                                 f"converts to {value.shape}, but the model's "
                                 f"{'/'.join(e.path)} is {want}")
        _set(variables, e.path, value)
    if flat_target is not None:
        left = [p for p in flat_target if p not in seen]
        if left:
            raise ValueError(f"model variable {'/'.join(left[0])} has no torchvision key in the "
                             f"name map ({len(left)} such variables)")
    return variables


def _state_dict(state_dict_or_path: StateDict | PathLike) -> StateDict:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        return load_state_dict(state_dict_or_path)
    return state_dict_or_path


def _abstract_variables(module: Any, image_hw: tuple[int, int] = (64, 64), *args: Any) -> Any:
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), np.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), images, *args)


def import_resnet(state_dict: StateDict | PathLike, model_config: Any) -> dict:
    """ImageNet torchvision classifier (keys `conv1.weight`, `layer1.0.conv1.weight`, ...,
    `fc.*` ignored) -> variables {"params", "batch_stats"} of `resnet_from_config(model_config)`.
    `model_config.backbone` picks the architecture, `.norm` the norm layout.
    """
    from mrcnn_jax.modeling.backbone.resnet import resnet_from_config

    module = resnet_from_config(model_config)
    entries = (resnet_entries(module.stage_sizes, model_config.norm)
               + imagenet_classifier_entries())
    return convert(_state_dict(state_dict), entries, _abstract_variables(module))


def import_resnet_fpn(state_dict: StateDict | PathLike, model_config: Any) -> dict:
    """`backbone.body.*` + `backbone.fpn.*` keys -> variables of `ResNetFPN.from_config(...)`
    (paths `body/...` and `fpn/...`). Pre-v2 FPN key names are accepted."""
    from mrcnn_jax.modeling.backbone.fpn import ResNetFPN

    module = ResNetFPN.from_config(model_config)
    sd = upgrade_legacy_fpn_keys(_state_dict(state_dict))
    entries = (resnet_entries(module.body.stage_sizes, model_config.norm,
                              torch_prefix="backbone.body.", path_prefix=("body",))
               + fpn_entries(path_prefix=("fpn",), norm=model_config.get("fpn_norm", "")))
    return convert(sd, entries, _abstract_variables(module))


def maskrcnn_entries(model_config: Any) -> list[Entry]:
    """The whole `maskrcnn_resnet50_fpn`-style map: backbone body + FPN + heads."""
    from mrcnn_jax.modeling.backbone.resnet import BACKBONES

    stage_sizes = BACKBONES[model_config.backbone].keywords["stage_sizes"]
    return (resnet_entries(stage_sizes, model_config.norm, torch_prefix="backbone.body.",
                           path_prefix=("backbone", "body"))
            + fpn_entries(norm=model_config.get("fpn_norm", "")) + heads_entries(model_config))


def _norm_at(state_dict: StateDict, prefix: str) -> str:
    """The norm of a Conv2dNormActivation whose norm would be `prefix` ("" when it has none)."""
    if f"{prefix}.running_mean" in state_dict:
        return "frozen_bn"
    return "group_norm" if f"{prefix}.weight" in state_dict else ""


def architecture_of(state_dict: StateDict) -> dict[str, Any]:
    """The `ARCHITECTURE_FIELDS` of the Mask R-CNN that `state_dict` (current key names, see
    `upgrade_legacy_*`) comes from: torchvision v1 gives {"fpn_norm": "", "head_norm": "",
    "box_head": "2fc", "rpn_conv_depth": 1}, v2 {"frozen_bn", "frozen_bn", "4conv1fc", 2}."""
    head_norm = ""
    for head in ("box_head", "mask_head"):
        head_norm = head_norm or _norm_at(state_dict, f"roi_heads.{head}.0.1")
    depth = 0
    while f"rpn.head.conv.{depth}.0.weight" in state_dict:
        depth += 1
    return {"fpn_norm": _norm_at(state_dict, "backbone.fpn.inner_blocks.0.1"),
            "head_norm": head_norm,
            "box_head": "4conv1fc" if "roi_heads.box_head.0.0.weight" in state_dict else "2fc",
            "rpn_conv_depth": max(depth, 1)}


def architecture_hint(state_dict: StateDict, model_config: Any) -> str:
    """"" when `model_config` has the `ARCHITECTURE_FIELDS` of `state_dict`'s model, else a
    sentence naming the fields that differ and the config file for these weights."""
    arch = architecture_of(state_dict)
    differ = [k for k, v in arch.items() if model_config.get(k) != v]
    if not differ:
        return ""
    fields = ", ".join(f"model.{k}={arch[k]!r} (config: {model_config.get(k)!r})" for k in differ)
    if arch["fpn_norm"] == "frozen_bn" and arch["box_head"] == "4conv1fc":
        which = "torchvision v2 weights (maskrcnn_resnet50_fpn_v2): use configs/fpn_r50_v2.py"
    elif any(k.startswith("roi_heads.keypoint_") for k in state_dict):
        which = "torchvision keypointrcnn_resnet50_fpn weights: use configs/keypoint_r50.py"
    else:
        which = "torchvision v1 weights (maskrcnn_resnet50_fpn): use configs/fpn_r50.py"
    return f"these look like {which} (the weights' model has {fields})"


def detector_config_overrides(state_dict: StateDict) -> dict[str, Any]:
    """The `config.model` fields torchvision's builder sets for these weights: FrozenBN eps 0 for
    a v1 layout (its COCO weights), BatchNorm2d's 1e-5 for v2 (BatchNorm after the FPN)."""
    v2 = architecture_of(upgrade_legacy_fpn_keys(state_dict))["fpn_norm"] == "frozen_bn"
    return dict(MASKRCNN_V2_CONFIG_OVERRIDES if v2 else MASKRCNN_CONFIG_OVERRIDES)


def detector_model_config(state_dict: StateDict, model_config: Any) -> Any:
    """`model_config` as the torchvision detector `state_dict` was built: its class count, its
    mask and keypoint branches (and their sizes), v1 or v2 layers (`architecture_of`) and the
    box head's widths read off the keys and shapes."""
    config = model_config.copy_and_resolve_references()
    config.update(architecture_of(state_dict))
    if config.box_head == "4conv1fc":
        n = 0
        while f"roi_heads.box_head.{n}.0.weight" in state_dict:
            n += 1
        config.box_head_conv_dims = tuple(
            int(np.shape(state_dict[f"roi_heads.box_head.{i}.0.weight"])[0]) for i in range(n))
        if f"roi_heads.box_head.{n + 1}.weight" in state_dict:  # else convert names it missing
            config.box_head_dim = int(
                np.shape(state_dict[f"roi_heads.box_head.{n + 1}.weight"])[0])
    elif "roi_heads.box_head.fc6.weight" in state_dict:
        config.box_head_dim = int(np.shape(state_dict["roi_heads.box_head.fc6.weight"])[0])
    config.num_classes = int(np.shape(state_dict["roi_heads.box_predictor.cls_score.weight"])[0])
    config.mask_head = any(k.startswith("roi_heads.mask_") for k in state_dict)
    if config.mask_head:
        layers = sorted({int(k.split(".")[2]) for k in state_dict
                         if k.startswith("roi_heads.mask_head.") and k.split(".")[2].isdigit()})
        config.mask_head_layers = tuple([256] * len(layers)) if layers else \
            config.mask_head_layers
    config.keypoint_head = any(k.startswith("roi_heads.keypoint_") for k in state_dict)
    if config.keypoint_head:
        config.num_keypoints = int(np.shape(
            state_dict["roi_heads.keypoint_predictor.kps_score_lowres.weight"])[1])
    return config


def convert_detector(state_dict: StateDict, model_config: Any) -> dict:
    """A torchvision Mask / Keypoint R-CNN state_dict -> its variables, with no shape target:
    the detector as it was trained (`detector_model_config`), whatever the model it goes into."""
    legacy_mask_layers = sum(k.startswith("roi_heads.mask_head.mask_fcn")
                             and k.endswith(".weight") for k in state_dict)
    sd = upgrade_legacy_head_keys(upgrade_legacy_fpn_keys(state_dict), legacy_mask_layers)
    return convert(sd, maskrcnn_entries(detector_model_config(sd, model_config)))


def keypointrcnn_model_config() -> Any:
    """`base_config().model` as torchvision's `keypointrcnn_resnet50_fpn` (COCO_V1 weights):
    2 classes (background, person), keypoint branch on, no mask branch, FrozenBN eps 0."""
    from mrcnn_jax.config_base import base_config

    model_config = base_config().model
    model_config.update(KEYPOINTRCNN_CONFIG_OVERRIDES)
    model_config.update(MASKRCNN_CONFIG_OVERRIDES)
    return model_config


def import_keypointrcnn(state_dict: StateDict | PathLike, model_config: Any = None,
                        target: Any = None) -> tuple[dict, dict]:
    """A torchvision Keypoint R-CNN state_dict -> (variables, config overrides), as
    `import_maskrcnn` (which it calls) with `keypointrcnn_model_config()` by default. The
    overrides set eps 0 as torchvision does for its COCO_V1 weights; its COCO_LEGACY weights
    keep FrozenBN's 1e-5 (set `frozen_bn_eps` back after applying them)."""
    if model_config is None:
        model_config = keypointrcnn_model_config()
    return import_maskrcnn(state_dict, model_config, target)


def import_maskrcnn(state_dict: StateDict | PathLike, model_config: Any = None,
                    target: Any = None) -> tuple[dict, dict]:
    """A torchvision Mask R-CNN state_dict -> (variables, config overrides).

    Returns MaskRCNN variables {"params", "batch_stats"} and `detector_config_overrides`
    ({"frozen_bn_eps": 0.0} for v1, 1e-5 for v2), to apply to `config.model` before building
    the model (torchvision's v1 COCO weights need eps = 0). `model_config` defaults to
    `base_config().model` with v1's overrides; v2 weights need configs/fpn_r50_v2.py's model (a
    ValueError names the first key at fault and says so). `target`: the model's abstract
    variables for the shape checks; by default they come from `jax.eval_shape` of
    `MaskRCNN(model_config).init` on a 256x256 image.
    """
    if model_config is None:
        from mrcnn_jax.config_base import base_config

        model_config = base_config().model
        model_config.update(MASKRCNN_CONFIG_OVERRIDES)
    if target is None:
        from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

        target = _abstract_variables(MaskRCNN(model_config), (256, 256),
                                     jax.ShapeDtypeStruct((1, 2), np.int32))
    sd = upgrade_legacy_fpn_keys(_state_dict(state_dict))
    sd = upgrade_legacy_head_keys(sd, len(model_config.mask_head_layers))
    try:
        variables = convert(sd, maskrcnn_entries(model_config), target)
    except ValueError as e:
        hint = architecture_hint(sd, model_config)
        if hint:
            raise ValueError(f"{hint}; {e}") from e
        raise
    return variables, detector_config_overrides(sd)
