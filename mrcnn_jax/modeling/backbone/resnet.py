"""ResNet / ResNeXt backbones in torchvision's layout (v1.5: stride on the 3x3 conv), NHWC.

Glossary: B batch, H/W input height/width, C2..C5 the outputs of layer1..layer4 at strides
4, 8, 16, 32 with 256, 512, 1024, 2048 channels (for the default width 64).

Parameter names follow torchvision so the weight import (`mrcnn_jax/checkpoints/torchvision.py`)
is a readable table: `conv1`, `bn1`, `layer{1..4}/block{j}/{conv1,bn1,conv2,bn2,conv3,bn3,
downsample_conv,downsample_bn}`. FrozenBatchNorm constants live in the `batch_stats` collection
(see `mrcnn_jax/modeling/norm.py`), never in `params`.

Variants are `functools.partial`s of `ResNet` (flax examples style): `ResNet50`, `ResNet101`,
`ResNeXt101_32x8d`, and `ResNetTiny` (1 block per stage, width 8) for fast tests.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.conv import kaiming_fan_out
from mrcnn_jax.modeling.norm import make_norm, norm_factory
from mrcnn_jax.modeling.precision import compute_dtype
from mrcnn_jax.modeling.remat import check_remat, maybe_remat

# torchvision's Bottleneck.expansion.
BOTTLENECK_EXPANSION = 4

# Stage names in torchvision's `trainable_layers` order (the last ones are frozen first).
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # torch pads symmetrically by k // 2; flax "SAME" with stride 2 would pad (0, 1) instead.
    return ((k // 2, k // 2), (k // 2, k // 2))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride, groups) -> 1x1 (x4), + shortcut, ReLU.

    x: [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), planes * 4]
    """

    planes: int
    stride: int = 1
    groups: int = 1
    width_per_group: int = 64
    norm: Callable[..., nn.Module] = norm_factory("frozen_bn")
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # modeling/conv.py

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out_ch = self.planes * BOTTLENECK_EXPANSION
        conv = functools.partial(layers.conv, self.conv_impl, use_bias=False, dtype=self.dtype,
                                 param_dtype=jnp.float32, kernel_init=kaiming_fan_out)
        y = conv(width, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(width, (3, 3), strides=(self.stride, self.stride), padding=_pad(3),
                 feature_group_count=self.groups, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv(out_ch, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            shortcut = conv(out_ch, (1, 1), strides=(self.stride, self.stride),
                            name="downsample_conv")(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
        return layers.materialized(self.conv_impl, nn.relu(y + shortcut))


class ResNetStage(nn.Module):
    """One torchvision `layerN`: `num_blocks` Bottlenecks, the first one strided."""

    num_blocks: int
    planes: int
    stride: int
    groups: int = 1
    width_per_group: int = 64
    norm: Callable[..., nn.Module] = norm_factory("frozen_bn")
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat: bool = False  # recompute each block in the backward (modeling/remat.py)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        block = maybe_remat(Bottleneck, self.remat)
        for j in range(self.num_blocks):
            x = block(self.planes, stride=self.stride if j == 0 else 1, groups=self.groups,
                      width_per_group=self.width_per_group, norm=self.norm, dtype=self.dtype,
                      conv_impl=self.conv_impl, name=f"block{j}")(x)
        return x


class ResNet(nn.Module):
    """Bottleneck ResNet/ResNeXt body without the classifier; returns [C2, C3, C4, C5]
    (the first `num_stages` of them).

    images: [B, H, W, 3] (normalised) -> C_l: [B, H / 2^l, W / 2^l, width * 2^(l-2) * 4] for
    l = 2..5 (sizes rounded up as torch's padded convs do).
    `norm` is a factory from `mrcnn_jax.modeling.norm` (default FrozenBatchNorm, eps 1e-5).
    """

    stage_sizes: Sequence[int]
    width: int = 64  # stem channels and the planes of layer1 (torchvision fixes 64)
    groups: int = 1
    width_per_group: int = 64
    norm: Callable[..., nn.Module] = norm_factory("frozen_bn")
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # modeling/conv.py
    # Stages run (4: C2..C5). The C4 architecture runs 3 and uses layer4 as its RoI box head
    # (modeling/roi_heads/res5_head.py), so the body holds no layer4 parameters.
    num_stages: int = 4
    # Modules of STAGES that do not train (`frozen_stages(trainable_backbone_layers)`): no
    # gradient flows into them, so the backward pass skips them as torch's requires_grad=False
    # does (without it XLA computes their gradients for the optimizer to throw away).
    frozen_stages: Sequence[str] = ()
    # Recompute each bottleneck block in the backward instead of keeping its inner activations
    # (`model.remat` "backbone", modeling/remat.py).
    remat: bool = False

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
        if images.ndim != 4:
            raise ValueError(f"images: expected [batch, height, width, channels], got shape "
                             f"{images.shape}")
        if len(self.stage_sizes) != 4:
            raise ValueError(f"stage_sizes: expected 4 stages, got {self.stage_sizes}")
        if not 1 <= self.num_stages <= 4:
            raise ValueError(f"num_stages: expected 1..4, got {self.num_stages}")
        x = layers.conv(self.conv_impl, self.width, (7, 7), strides=(2, 2), padding=_pad(7),
                        use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=kaiming_fan_out, name="conv1")(images.astype(self.dtype))
        x = nn.relu(self.norm(name="bn1")(x))
        x = layers.max_pool(self.conv_impl, x, (3, 3), (2, 2), _pad(3))
        x = self._maybe_stop_gradient("conv1", x)
        outputs = []
        for i, num_blocks in enumerate(self.stage_sizes[:self.num_stages]):
            x = ResNetStage(num_blocks, planes=self.width * 2**i, stride=1 if i == 0 else 2,
                            groups=self.groups, width_per_group=self.width_per_group,
                            norm=self.norm, dtype=self.dtype, conv_impl=self.conv_impl,
                            remat=self.remat, name=f"layer{i + 1}")(x)
            x = self._maybe_stop_gradient(f"layer{i + 1}", x)
            outputs.append(x)
        return outputs

    def _maybe_stop_gradient(self, stage: str, x: jnp.ndarray) -> jnp.ndarray:
        # Frozen stages are a prefix of STAGES, so stopping at each one's output cuts the
        # backward pass exactly at the last frozen stage.
        return jax.lax.stop_gradient(x) if stage in self.frozen_stages else x

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of C2..C5."""
        return tuple(self.width * 2**i * BOTTLENECK_EXPANSION for i in range(4))


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNeXt101_32x8d = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), groups=32,
                                     width_per_group=8)
# For tests: every code path (strides, downsample shortcuts, groups) at a tiny cost.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
ResNeXtTiny = functools.partial(ResNet, stage_sizes=(1, 2, 1, 1), width=8, groups=4,
                                width_per_group=32)

# torchvision's constructor names -> our variants (the `model.backbone` config values).
BACKBONES: Mapping[str, Callable[..., ResNet]] = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnext101_32x8d": ResNeXt101_32x8d,
    "resnet_tiny": ResNetTiny,
    "resnext_tiny": ResNeXtTiny,
}


def resnet_from_config(model_config: Any, **overrides: Any) -> ResNet:
    """The ResNet named by `model_config.backbone`, with the norm, dtype, frozen stages
    (`trainable_backbone_layers`) and rematerialisation (`remat`) of `model_config`."""
    name = model_config.backbone
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; expected one of "
                         f"{sorted(BACKBONES)}")
    overrides.setdefault("frozen_stages",
                         frozen_stages(model_config.trainable_backbone_layers))
    overrides.setdefault("remat", "backbone" in check_remat(model_config.remat))
    return BACKBONES[name](norm=make_norm(model_config), dtype=compute_dtype(model_config.dtype),
                           conv_impl=model_config.conv_impl, **overrides)


def frozen_stages(trainable_backbone_layers: int) -> tuple[str, ...]:
    """Top-level ResNet modules that do not train, as torchvision's `trainable_layers` (0..5).

    3 (the default) trains layer2..layer4 and freezes conv1 (with bn1) and layer1; 5 trains all;
    0 freezes the whole body.
    """
    if not 0 <= trainable_backbone_layers <= len(STAGES):
        raise ValueError(f"trainable_backbone_layers: expected 0..{len(STAGES)}, got "
                         f"{trainable_backbone_layers}")
    frozen = STAGES[:len(STAGES) - trainable_backbone_layers]
    # bn1 belongs to the stem: it trains only when conv1 does (torchvision adds "bn1" at 5).
    return frozen + ("bn1",) if "conv1" in frozen else frozen


def trainable_mask(params: Any, trainable_backbone_layers: int,
                   body_key: str | None = "body") -> Any:
    """A pytree of bools like `params`: True where the optimizer may update the leaf.

    The ResNet body is the subtree under a module named `body_key` anywhere in the path (the
    name `ResNetFPN` gives it, so a whole Mask R-CNN params tree works); pass `body_key=None` when
    `params` is a bare `ResNet` tree. Leaves outside the body (FPN, heads) are always trainable.
    Use with `optax.masked(tx, mask)` or `optax.multi_transform`. FrozenBatchNorm constants are
    in `batch_stats`, not in `params`, so they never appear here.
    """
    frozen = set(frozen_stages(trainable_backbone_layers))

    def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
        keys = [getattr(p, "key", getattr(p, "name", p)) for p in path]
        if body_key is None:
            return not (keys and keys[0] in frozen)
        for i, k in enumerate(keys[:-1]):
            if k == body_key:
                return keys[i + 1] not in frozen
        return True

    return jax.tree_util.tree_map_with_path(is_trainable, params)
