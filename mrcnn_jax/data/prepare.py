r"""Prepare a config's data set once and show what training will see: the tfds copy, the bad
records of every split by name, and the label map for `model.num_classes`.

    python -m mrcnn_jax.data.prepare --config=configs/coco_export.py:/data/my_export

Training prepares the data itself when it is missing; this command does it ahead of time (one
process preparing into a shared `data.data_dir` before a multi-host run) and lets a problem with
the data show before a run starts. Exits 1 with the reason on a missing path, a malformed json or a
`model.num_classes` the data contradicts.
"""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

from mrcnn_jax.data import coco_instances

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)


def describe(config) -> str:
    """Prepares `config.data` and returns the report: splits, bad data, label map."""
    builder = coco_instances.get_builder(config.data)
    info = builder.info
    lines = [f"{info.full_name} in {builder.data_dir}"]
    bad = info.metadata.get("bad_data", {})
    for split, split_info in sorted(info.splits.items()):
        counts = bad.get(split) or {}
        lines.append(f"  {split}: {split_info.num_examples} images; bad data: "
                     + (", ".join(f"{k}={v}" for k, v in counts.items()) or "none"))
    hint = raw_canvas_hint(config.data)
    if hint:
        lines.append(f"  {hint}")
    label_map, notes = coco_instances.label_map_for_info(info, config.model.num_classes)
    lines += [f"  label map: {note}" for note in notes]
    lines.append(f"label map ({len(label_map.labels)} classes + background):")
    lines.append(label_map.describe())
    return "\n".join(lines)


def raw_canvas_hint(data_config) -> str:
    """How to carry a COCO-format train split's pixels in fewer bytes, when its largest image
    (the json's sizes) is smaller than the raw pixel canvas on a side; "" otherwise."""
    from mrcnn_jax.data import coco_json, input_pipeline

    path = data_config.get("train_annotations", "")
    if data_config.dataset != "coco_format" or not path:
        return ""
    images = coco_json.load_json(path, "data.train_annotations").get("images") or []
    sizes = [(int(i["height"]), int(i["width"])) for i in images
             if isinstance(i, dict) and "height" in i and "width" in i]
    if not sizes:
        return ""
    high, wide = max(h for h, _ in sizes), max(w for _, w in sizes)
    raw_h, raw_w = input_pipeline.raw_canvas_size(data_config)
    if high >= raw_h and wide >= raw_w:
        return ""
    fit_h, fit_w = min(high, raw_h), min(wide, raw_w)
    return (f"train images are at most {high}x{wide} (height x width): "
            f"--config.data.raw_canvas_size='({fit_h},{fit_w})' carries them exactly in "
            f"{raw_h * raw_w / (fit_h * fit_w):.1f}x fewer pixel bytes per batch than the "
            f"{raw_h}x{raw_w} raw canvas")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    try:
        print(describe(_CONFIG.value))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"prepare: error: {e}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
