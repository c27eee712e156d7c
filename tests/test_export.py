"""export.py and `mrcnn_jax.export.load` on a tiny random model: the loaded program gives the
Predictor's detections (boxes, scores, labels, pasted masks) for images of several sizes in
batches with a padded last one, the SavedModel gives the program's raw outputs, the loader
imports neither flax nor model code, a TPU lowering needs no TPU, and bad arguments fail naming
what was wrong. One export (through the command line) is shared by the module."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import export as export_lib
from mrcnn_jax import transforms
from mrcnn_jax.checkpoints.orbax_io import save_variables
from mrcnn_jax.data.label_map import LabelMap
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops.bilinear import resize_bilinear
from mrcnn_jax.predictor import Predictor, load_weights
from tests.tiny_predict_config import TINY_CONFIG, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

BATCH = 2
CANVAS = (96, 96)  # the default: max_size 96 is a multiple of size_divisibility 32
# Five images (two full batches and a padded one), upright, wide, tall, small: all fit CANVAS.
SIZES = [(50, 70), (60, 90), (96, 64), (31, 45), (90, 93)]
# A training run's label map (written beside the weights, read back by load_weights_and_label_map).
LABEL_MAP = LabelMap(num_classes=4, labels=(1, 2, 3), category_ids=(7, 3, 9),
                     names=("circle", "square", "triangle"))


def _run(script: str, *args):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Variables with their label map (weights/label_map.json), exported by export.py."""
    root = tmp_path_factory.mktemp("export")
    config_path = root / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    config = load_config(config_path)
    variables = MaskRCNN(config.model).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)), jnp.array([[64, 96]], jnp.int32))
    weights = root / "weights"
    save_variables(weights, variables)
    LABEL_MAP.save(weights)
    out = root / "exported"
    proc = _run("export.py", f"--config={config_path}", f"--weights={weights}", f"--out={out}",
                f"--batch_size={BATCH}", "--platforms=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in SIZES]
    return dict(root=root, config_path=config_path, config=config, weights=weights, out=out,
                images=images, loaded=export_lib.load(out))


def test_meta_json_describes_the_program(exported):
    meta = json.loads((exported["out"] / "meta.json").read_text())
    assert meta["batch_size"] == BATCH and meta["canvas"] == list(CANVAS)
    assert meta["platforms"] == ["cpu"] and meta["conv_impl"] == "cpu"
    assert meta["labels"] == [{"label": 1, "category_id": 7, "name": "circle"},
                              {"label": 2, "category_id": 3, "name": "square"},
                              {"label": 3, "category_id": 9, "name": "triangle"}]
    assert meta["preprocessing"]["min_size"] == 64 and meta["preprocessing"]["max_size"] == 96
    assert meta["preprocessing"]["pixel_mean"] == [0.485, 0.456, 0.406]
    assert meta["inputs"] == {"images": {"shape": [BATCH, *CANVAS, 3], "dtype": "uint8"},
                              "image_sizes": {"shape": [BATCH, 2], "dtype": "int32"}}
    assert meta["outputs"]["mask_probs"] == {"shape": [BATCH, 10, 28, 28], "dtype": "float32"}
    assert meta["outputs"]["num_detections"] == {"shape": [BATCH], "dtype": "int32"}
    assert meta["versions"]["jax"] == jax.__version__ and meta["mask_threshold"] == 0.5
    assert exported["loaded"].category_ids == {1: 7, 2: 3, 3: 9}


def test_loaded_program_equals_predictor(exported):
    """Same taps, same model, same paste: equal to the Predictor on a fixed canvas. Measured:
    bit-equal in the full batches; the padded last batch (a batch-2 program against the
    Predictor's batch-1 one) within 4e-6 in the boxes, masks equal."""
    config = exported["config"]
    predictor = Predictor(config, load_weights(exported["weights"], config.model),
                          batch_size=BATCH, canvas_hw=CANVAS)
    expected = predictor(exported["images"])
    got = exported["loaded"](exported["images"])
    assert len(got) == len(SIZES)
    for hw, g, e in zip(SIZES, got, expected):
        assert len(g["scores"]) == len(e["scores"]) > 0
        np.testing.assert_array_equal(g["labels"], e["labels"])
        np.testing.assert_allclose(g["boxes"], e["boxes"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(g["scores"], e["scores"], rtol=0, atol=1e-5)
        assert g["masks"].shape == (len(e["scores"]), *hw) and g["masks"].dtype == bool
        np.testing.assert_array_equal(g["masks"], e["masks"])
        assert g["masks"].any()


def test_image_larger_than_the_canvas_is_shrunk_not_cropped(exported):
    """A 120 x 100 image (> 96 x 96) goes in shrunk to its resized size 76 x 64 (the model's rule,
    rounded to uint8): its detections are the Predictor's on that shrunk image, scaled by the
    float32 ratios back to 120 x 100 pixels, with masks at 120 x 100."""
    image = np.random.default_rng(1).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    size = transforms.resized_size(120, 100, 64, 96)
    assert size == (76, 64)
    shrunk = np.clip(np.rint(resize_bilinear(image, size)), 0, 255).astype(np.uint8)
    config = exported["config"]
    predictor = Predictor(config, load_weights(exported["weights"], config.model),
                          canvas_hw=CANVAS)
    expected = predictor([shrunk])[0]
    got = exported["loaded"]([image])[0]
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=1e-5)
    scaled = transforms.boxes_to_original(expected["boxes"], size, (120, 100))
    np.testing.assert_allclose(got["boxes"], scaled, rtol=1e-6, atol=1e-4)
    assert got["masks"].shape == (len(got["scores"]), 120, 100)


def test_saved_model_gives_the_programs_outputs(exported):
    """The SavedModel (jax2tf, run by TensorFlow's XLA) against model.jax (run by jax) on the
    same canvas batch. Measured: boxes within 4e-6, mask probabilities within 9e-7, labels and
    valid equal."""
    import tensorflow as tf

    loaded = exported["loaded"]
    images = np.zeros((BATCH, *CANVAS, 3), np.uint8)
    sizes = np.array([SIZES[0], SIZES[2]], np.int32)
    for i, k in enumerate((0, 2)):
        images[i, :SIZES[k][0], :SIZES[k][1]] = exported["images"][k]
    expected = loaded.run(images, sizes)
    serve = tf.saved_model.load(str(exported["out"] / "saved_model")).signatures["serving_default"]
    got = {k: v.numpy() for k, v in serve(images=tf.constant(images),
                                          image_sizes=tf.constant(sizes)).items()}
    assert set(got) == set(expected) == {"boxes", "scores", "labels", "valid", "num_detections",
                                         "mask_probs"}
    for key in ("labels", "valid", "num_detections"):
        np.testing.assert_array_equal(got[key], expected[key])
    for key in ("boxes", "scores", "mask_probs"):
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-4)
    assert expected["num_detections"].min() > 0


def test_program_resize_rule_and_taps_equal_the_hosts_to_the_bit():
    """The exported resize plan (float64 inside) against `transforms.resized_size` and
    `image_resize.axis_taps` for COCO's sizes on its 1344 x 1344 canvas: 60 random sizes, photo
    sizes and sizes where the float64 rule is one pixel below the exact one (1 x 149 -> 8 x 1332,
    not 1333), which float32 or integer arithmetic would get wrong."""
    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.ops.image_resize import axis_taps

    data = base_config().data
    rng = np.random.default_rng(0)
    sizes = [(1, 149), (149, 1), (2, 298), (1, 153), (480, 640), (427, 640), (640, 480),
             (800, 1333), (1333, 800), (3000, 4000), *map(tuple, rng.integers(1, 2000, (60, 2)))]
    plan = export_lib._export_resize_plan(len(sizes), (1344, 1344), data, ("cpu",))
    resized, rows, cols = jax.tree_util.tree_map(np.asarray, plan.call(np.int32(sizes)))
    assert tuple(resized[0]) == (8, 1332)
    for i, (h, w) in enumerate(sizes):
        expected = transforms.resized_size(h, w, data.min_size, data.max_size)
        assert tuple(resized[i]) == expected, (h, w)
        for got, n, out in ((rows, h, expected[0]), (cols, w, expected[1])):
            for g, e in zip(got, axis_taps(n, out, 1344)):
                np.testing.assert_array_equal(g[i], e, err_msg=f"{(h, w)}")

def test_loader_imports_neither_flax_nor_model_code(exported):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from mrcnn_jax import export
        predict = export.load({str(exported["out"])!r})
        result = predict([np.full((40, 60, 3), 128, np.uint8)])[0]
        assert result["masks"].shape[1:] == (40, 60), result["masks"].shape
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("flax", "tensorflow", "optax", "orbax")
                     or m.startswith("mrcnn_jax.modeling"))
        print("IMPORTED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout


def test_tpu_lowering_needs_no_tpu(exported, tmp_path):
    """platforms cpu,tpu: model.jax and the SavedModel are written here (lowering only), and the
    program still runs on the CPU; "auto" convolutions become flax's stock layers."""
    config = exported["config"]
    variables = load_weights(exported["weights"], config.model)
    meta = export_lib.export_model(config, variables, tmp_path, batch_size=1,
                                   platforms="cpu,tpu")
    assert meta["platforms"] == ["cpu", "tpu"] and meta["conv_impl"] == "xla"
    blob = (tmp_path / "model.jax").read_bytes()
    assert jax.export.deserialize(bytearray(blob)).platforms == ("cpu", "tpu")
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    tpu_only = export_lib.export_model(config, variables, tmp_path / "tpu", platforms=["tpu"],
                                       saved_model=False)
    assert tpu_only["platforms"] == ["tpu"]
    # model.dtype "auto" is what it means on the platforms, not on the exporting CPU.
    assert meta["compute_dtype"] == tpu_only["compute_dtype"] == "float32"
    config_auto = config.copy_and_resolve_references()
    config_auto.model.dtype = "auto"
    for platforms, dtype in (("tpu", "bfloat16"), ("cpu,tpu", "float32"), ("cpu", "float32")):
        resolved = export_lib.resolve_model_config(config_auto.model, platforms.split(","))
        assert resolved.dtype == dtype, platforms
    with pytest.raises(ValueError, match=r"exported for \['tpu'\].*--platforms=cpu"):
        export_lib.load(tmp_path / "tpu")


def test_bfloat16_model_exports_float32_outputs_equal_to_its_predictor(exported, tmp_path):
    """model.dtype=bfloat16: the program computes in bf16 (its scores differ from the float32
    program's) and returns float32 outputs equal to the bf16 Predictor's. Measured: bit-equal."""
    config = exported["config"].copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    variables = load_weights(exported["weights"], config.model)
    meta = export_lib.export_model(config, variables, tmp_path, batch_size=BATCH,
                                   platforms=["cpu"], saved_model=False)
    assert meta["compute_dtype"] == "bfloat16"
    assert {meta["outputs"][k]["dtype"] for k in ("boxes", "scores", "mask_probs")} == {"float32"}
    images = exported["images"][:BATCH]
    got = export_lib.load(tmp_path)(images)
    expected = Predictor(config, variables, batch_size=BATCH, canvas_hw=CANVAS)(images)
    float32 = exported["loaded"](images)
    for g, e, f in zip(got, expected, float32):
        assert len(g["scores"]) == len(e["scores"]) > 0 and g["scores"].dtype == np.float32
        np.testing.assert_array_equal(g["labels"], e["labels"])
        np.testing.assert_allclose(g["boxes"], e["boxes"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(g["scores"], e["scores"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(g["masks"], e["masks"])
        assert not np.array_equal(g["scores"], f["scores"])


def test_bad_arguments_fail_naming_them(exported, tmp_path):
    args = [f"--config={exported['config_path']}", f"--out={tmp_path / 'out'}"]
    missing = tmp_path / "no_such_weights"
    proc = _run("export.py", *args, f"--weights={missing}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr and str(missing) in proc.stderr
    proc = _run("export.py", *args, f"--weights={exported['weights']}", "--platforms=cpu,gpux")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown platform(s) ['gpux']" in proc.stderr and "cpu, cuda, rocm, tpu" in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="does not cover data.max_size=96"):
        export_lib.check_canvas((64, 96), exported["config"].data)
    with pytest.raises(ValueError, match="not a multiple of data.size_divisibility=32"):
        export_lib.check_canvas((100, 100), exported["config"].data)
    with pytest.raises(ValueError, match="uint8"):
        exported["loaded"]([np.zeros((20, 20, 3), np.float32)])


@pytest.mark.slow
def test_keypoint_model_exports_keypoints(exported, tmp_path):
    """A Keypoint R-CNN (keypoint branch on, mask branch off): keypoints in original pixels equal
    the Predictor's, no masks."""
    config_path = tmp_path / "tiny_keypoints.py"
    config_path.write_text(TINY_CONFIG.replace(
        "    return c\n", "    m.num_classes = 2\n    m.mask_head = False\n"
        "    m.keypoint_head = True\n    m.keypoint_head_layers = (16, 16)\n    return c\n"))
    config = load_config(config_path)
    variables = MaskRCNN(config.model).init(
        jax.random.PRNGKey(1), jnp.zeros((1, 64, 96, 3)), jnp.array([[64, 96]], jnp.int32))
    meta = export_lib.export_model(config, variables, tmp_path / "kp", saved_model=False)
    assert meta["num_keypoints"] == 17 and "mask_probs" not in meta["outputs"]
    images = exported["images"][:3]
    got = export_lib.load(tmp_path / "kp")(images)
    expected = Predictor(config, variables, canvas_hw=CANVAS)(images)
    for g, e in zip(got, expected):
        assert "masks" not in g and len(g["scores"]) == len(e["scores"]) > 0
        np.testing.assert_allclose(g["boxes"], e["boxes"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(g["keypoints"], e["keypoints"], rtol=0, atol=1e-4)

