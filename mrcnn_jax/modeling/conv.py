"""The model's convolution layer: flax's `nn.Conv` with ops/conv.py's kernel gradient.

Same parameters, names and forward values as `nn.Conv` (the class is also called `Conv`, so
auto-named layers keep flax's `Conv_<i>` names and imported checkpoints still fit); only the way
the kernel gradient is computed on CPU differs (see `mrcnn_jax.ops.conv`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mrcnn_jax.ops import conv as conv_ops


class Conv(nn.Conv):
    conv_general_dilated: Any = conv_ops.conv_general_dilated
