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
    label_map, notes = coco_instances.label_map_for_info(info, config.model.num_classes)
    lines += [f"  label map: {note}" for note in notes]
    lines.append(f"label map ({len(label_map.labels)} classes + background):")
    lines.append(label_map.describe())
    return "\n".join(lines)


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
