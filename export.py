r"""Export a trained Mask R-CNN as one serialised program: model.jax (`jax.export`), a TF
SavedModel (jax2tf) and meta.json, for serving without the model's code (docs/deploy.md).

    python export.py --config=configs/shapes.py --weights=workdir_demo \
        --out=exported/ [--batch_size=1] [--canvas=H,W] [--platforms=cpu,cuda,tpu]

--weights: as predict.py (a training workdir, its checkpoints/ or one step, an orbax variables
directory or a torchvision state_dict).
--canvas: the fixed input canvas; default max_size x max_size rounded up to size_divisibility
(every image fits after the model's resize). --platforms: what the program is lowered for
(default: this machine's); lowering needs no such device. Labels go into meta.json as predict.py
maps them: --categories (a COCO-format json the model was trained on), else the training run's
label_map.json, else COCO's names for torchvision's 91-way head. Load the export back with
`mrcnn_jax.export.load(DIR)`.
A missing weights file or an unknown platform stops with an error naming it (exit status 1).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights: a training workdir (or its "
                               "checkpoints/ or a step), an orbax variables dir or a torchvision "
                               ".pth/.safetensors/.npz.")
_OUT = flags.DEFINE_string("out", None, "Output directory (model.jax, saved_model/, meta.json).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per call of the exported program.")
_CANVAS = flags.DEFINE_list("canvas", [], "H,W of the input canvas (default: covers max_size).")
_PLATFORMS = flags.DEFINE_list("platforms", [], "Any of cpu,cuda,rocm,tpu (default: this "
                               "machine's platform).")
_CATEGORIES = flags.DEFINE_string(
    "categories", "", "COCO-format json whose categories give label -> category id and names.")
_SAVED_MODEL = flags.DEFINE_bool("saved_model", True, "Also write the TF SavedModel.")
flags.mark_flags_as_required(["config", "weights", "out"])


def run(config, weights: str, out_dir: str, batch_size: int, canvas: list[str],
        platforms: list[str], categories: str, saved_model: bool) -> dict:
    """The whole command; returns meta.json's content."""
    import jax

    from mrcnn_jax import export, predictor

    # Arguments first: a typo fails before minutes of loading and lowering.
    backend = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    platforms = export.check_platforms(platforms or [backend])
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    canvas_hw = None
    if canvas:
        if len(canvas) != 2 or not all(v.strip().isdigit() for v in canvas):
            raise ValueError(f"--canvas must be H,W (two integers), got {','.join(canvas)}")
        canvas_hw = export.check_canvas([int(v) for v in canvas], config.data)
    variables, weights_labels = predictor.load_weights_and_label_map(weights, config.model)
    label_map = predictor.label_map_of(config.model.num_classes, categories, weights_labels)
    return export.export_model(config, variables, out_dir, batch_size, canvas_hw, platforms,
                               label_map, saved_model)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        meta = run(_CONFIG.value, _WEIGHTS.value, _OUT.value, _BATCH.value, _CANVAS.value,
                   _PLATFORMS.value, _CATEGORIES.value, _SAVED_MODEL.value)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"export.py: error: {e}")
    print(f"{_OUT.value}: batch {meta['batch_size']}, canvas {meta['canvas']}, platforms "
          f"{','.join(meta['platforms'])}, {len(meta['labels'])} labels")


if __name__ == "__main__":
    app.run(main)
