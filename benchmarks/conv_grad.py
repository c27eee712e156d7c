"""Convolution kernel-gradient benchmark: XLA's backward-filter convolution vs cpu/conv.py's
per-tap matrix products, on the convolutions of R50-FPN Mask R-CNN at 800 x 1216, batch 2.

Run:  .venv/bin/python benchmarks/conv_grad.py [--repeats 3]

For each layer shape the table gives the median time of the forward convolution, of XLA's input
gradient and of the kernel gradient both ways (jitted, compiled first, median of `--repeats`
calls after a warm-up), the kernel-gradient times as multiples of the forward, the speed-up of
the per-tap form, and its largest difference from XLA's gradient relative to the gradient's
largest magnitude. Written to benchmarks/results/conv_grad.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np
from jax import lax

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mrcnn_jax.cpu import conv as conv_ops  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
# (layer, input [n, h, w, in], kernel [kh, kw, in, out], stride): R50-FPN at 800 x 1216, batch 2
# (P2 is 200 x 304), and the 14 x 14 mask-head convs over 2 x 128 foreground RoIs.
LAYERS = (
    ("stem 7x7/2", (2, 800, 1216, 3), (7, 7, 3, 64), 2),
    ("layer1 3x3", (2, 200, 304, 64), (3, 3, 64, 64), 1),
    ("layer2 3x3", (2, 100, 152, 128), (3, 3, 128, 128), 1),
    ("layer3 3x3", (2, 50, 76, 256), (3, 3, 256, 256), 1),
    ("layer4 3x3", (2, 25, 38, 512), (3, 3, 512, 512), 1),
    ("layer2 1x1", (2, 100, 152, 512), (1, 1, 512, 128), 1),
    ("FPN P2 3x3", (2, 200, 304, 256), (3, 3, 256, 256), 1),
    ("mask head 3x3", (256, 14, 14, 256), (3, 3, 256, 256), 1),
)


def _median_s(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_layer(name, x_shape, k_shape, stride, repeats):
    key_x, key_k, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(key_x, x_shape)
    kernel = jax.random.normal(key_k, k_shape) * 0.05
    strides = (stride, stride)
    pads = lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, "SAME")

    def conv(v, k):
        return lax.conv_general_dilated(v, k, strides, pads, dimension_numbers=NHWC)

    d_out = jax.random.normal(key_g, jax.eval_shape(conv, x, kernel).shape)
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda k, g: jax.vjp(lambda v: conv(v, k), x)[1](g)[0])
    xla_kernel_grad = jax.jit(lambda v, g: jax.vjp(lambda k: conv(v, k), kernel)[1](g)[0])
    taps_kernel_grad = jax.jit(lambda v, g: conv_ops.kernel_grad_by_taps(
        v, g, k_shape, strides, pads))
    want, got = np.asarray(xla_kernel_grad(x, d_out)), np.asarray(taps_kernel_grad(x, d_out))
    row = {
        "layer": name, "input": list(x_shape), "kernel": list(k_shape), "stride": stride,
        "forward_ms": 1e3 * _median_s(forward, x, kernel, repeats=repeats),
        "input_grad_ms": 1e3 * _median_s(input_grad, kernel, d_out, repeats=repeats),
        "xla_kernel_grad_ms": 1e3 * _median_s(xla_kernel_grad, x, d_out, repeats=repeats),
        "taps_kernel_grad_ms": 1e3 * _median_s(taps_kernel_grad, x, d_out, repeats=repeats),
        "max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max()),
    }
    row["speedup"] = row["xla_kernel_grad_ms"] / row["taps_kernel_grad_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "conv_grad.json"))
    args = parser.parse_args()
    header = (f"{'layer':<14} {'fwd ms':>8} {'dX ms':>8} {'dW xla ms':>10} {'dW taps ms':>11} "
              f"{'xla/fwd':>8} {'taps/fwd':>9} {'speed-up':>9} {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    load_before = os.getloadavg()[0]
    for layer in LAYERS:
        r = run_layer(*layer, repeats=args.repeats)
        rows.append(r)
        print(f"{r['layer']:<14} {r['forward_ms']:8.1f} {r['input_grad_ms']:8.1f} "
              f"{r['xla_kernel_grad_ms']:10.1f} {r['taps_kernel_grad_ms']:11.1f} "
              f"{r['xla_kernel_grad_ms'] / r['forward_ms']:7.1f}x "
              f"{r['taps_kernel_grad_ms'] / r['forward_ms']:8.1f}x {r['speedup']:8.2f}x "
              f"{r['max_rel_diff']:9.1e}", flush=True)
    out = {"benchmark": "conv_grad", "repeats": args.repeats,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "device": str(jax.devices()[0]),
                       "load_before": load_before, "load_after": os.getloadavg()[0]},
           "rows": rows}
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
