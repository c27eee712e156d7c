"""Keep tests on the CPU and quiet; see tests/reference.py for the reference-array helpers."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# The suite's programs are small and run for milliseconds: compiling them is most of its time.
# LLVM at optimisation level 0 compiles them in ~2/3 of the time (the whole suite on 2 cores,
# 17.5 -> 11.0 min) and changes nothing but float rounding, which every tolerance here covers.
# Users, the CLIs run by hand and benchmarks/ keep XLA's default. MRCNN_TEST_XLA_FLAGS="" runs
# the suite with it too; tests/child_env.py passes these flags on to the processes tests start.
os.environ.setdefault("MRCNN_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
_suite_flags = [f for f in os.environ["MRCNN_TEST_XLA_FLAGS"].split()
                if f not in os.environ.get("XLA_FLAGS", "").split()]
if _suite_flags:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_suite_flags]).strip()

# The suite compiles the same small programs many times: in several test files and in the CLIs
# the tests start (train.py, eval.py, predict.py). JAX's persistent compilation cache, keyed on
# the program, the jax version and the compiler's options, turns the repeats into loads. The
# process pytest starts makes one directory per run; the xdist workers and the CLIs inherit it
# through the environment, and it is removed at the end. MRCNN_TEST_JAX_CACHE="" turns it off.
_CREATED_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "MRCNN_TEST_JAX_CACHE" not in os.environ:
    _CREATED_CACHE = os.environ["MRCNN_TEST_JAX_CACHE"] = tempfile.mkdtemp(
        prefix="mrcnn_jax_tests_")
if os.environ.get("MRCNN_TEST_JAX_CACHE"):
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MRCNN_TEST_JAX_CACHE"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    if _CREATED_CACHE:
        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)


# Loading torchvision's C++ ops after TensorFlow in one process segfaults (seen with
# tensorflow-cpu 2.21 + torchvision 0.29.1); the other order works. Import torch first whenever the
# optional parity extra is installed, so any subset of the suite is safe.
try:
    import torch  # noqa: F401
    import torchvision.ops  # noqa: F401
except ImportError:
    pass


# The longest test files (minutes each on a 2-core machine), handed out first: `make test`'s
# xdist workers take whole files in collection order, and a long file collected last would
# leave one worker running it alone at the end.
LONGEST_FILES = (
    "tests/test_own_data.py",
    "tests/training/test_train_lib.py",
    "tests/scale/test_data_parallel.py",
    "tests/modeling/test_conv_impl.py",
    "tests/ops/test_roi_align.py",
    "tests/modeling/test_mask_rcnn_v2_parity.py",
    "tests/test_export.py",
    "tests/ablations/test_ablations.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
