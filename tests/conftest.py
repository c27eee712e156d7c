"""Keep tests on the CPU and quiet; see tests/reference.py for the reference-array helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Loading torchvision's C++ ops after TensorFlow in one process segfaults (seen with
# tensorflow-cpu 2.21 + torchvision 0.29.1); the other order works. Import torch first whenever the
# optional parity extra is installed, so any subset of the suite is safe.
try:
    import torch  # noqa: F401
    import torchvision.ops  # noqa: F401
except ImportError:
    pass
