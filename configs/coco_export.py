"""Mask R-CNN, ResNet-50-FPN, on a COCO-format export folder (Roboflow's layout, or any like it).

    python train.py --config=configs/coco_export.py:/data/my_export --workdir=ckpt/mine \
        --config.train.init_from=resnet50-0676ba61.pth

The argument is the export folder, optionally followed by `,size=N` (short and long side bound N:
the canvas is N rounded up to a multiple of 32; default COCO's 800 / 1333 on a 1344 canvas) and
`,eval=SPLIT`. Splits are the folder's subfolders that hold one `*.json` beside their images:
`train` trains, SPLIT or else the first of `valid`, `val`, `validation`, `test` evaluates. `model.num_classes` is taken from the
data (0): the categories some annotation uses, in id order (data/label_map.py). Schedule: the
1x recipe shortened to `num_steps` (override it); the LR follows the global batch.
"""

from __future__ import annotations

import pathlib

import ml_collections

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data.label_map import NUM_CLASSES_FROM_DATA

EVAL_SPLIT_NAMES = ("valid", "val", "validation", "test")


def split_json(folder: pathlib.Path) -> pathlib.Path:
    """The one COCO json of a split folder."""
    found = sorted(folder.glob("*.json"))
    if len(found) != 1:
        raise ValueError(f"configs/coco_export.py: {folder} must hold exactly one COCO json "
                         f"beside its images, found {[p.name for p in found]}")
    return found[0]


def parse_arg(arg: str | None) -> tuple[pathlib.Path, int, str]:
    """'FOLDER[,size=N][,eval=SPLIT]' -> (folder, size or 0, eval split name or '')."""
    if not arg:
        raise ValueError("configs/coco_export.py needs the export folder: "
                         "--config=configs/coco_export.py:/path/to/export[,size=N][,eval=test]")
    folder, *options = arg.split(",")
    size, eval_split = 0, ""
    for option in options:
        key, _, value = option.partition("=")
        if key == "size" and value.isdigit():
            size = int(value)
        elif key == "eval" and value:
            eval_split = value
        else:
            raise ValueError(f"configs/coco_export.py: unknown option {option!r} "
                             f"(size=N, eval=SPLIT)")
    return pathlib.Path(folder).expanduser().resolve(), size, eval_split


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    folder, size, eval_split = parse_arg(arg)
    if not folder.is_dir():
        raise FileNotFoundError(f"configs/coco_export.py: export folder not found: {folder}")
    c = base_config()
    c.model.num_classes = NUM_CLASSES_FROM_DATA
    d = c.data
    d.dataset = "coco_format"
    d.dataset_name = folder.name
    train = folder / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"configs/coco_export.py: {folder} has no train/ folder")
    d.train_split = "train"
    d.train_images, d.train_annotations = str(train), str(split_json(train))
    if eval_split and not (folder / eval_split).is_dir():
        raise FileNotFoundError(f"configs/coco_export.py: eval={eval_split}: no folder "
                                f"{folder / eval_split}")
    for name in (eval_split,) if eval_split else EVAL_SPLIT_NAMES:
        if (folder / name).is_dir():
            d.eval_split = name
            d.eval_images, d.eval_annotations = str(folder / name), str(
                split_json(folder / name))
            break
    else:
        d.eval_images = d.eval_annotations = ""
    if size:
        canvas = -(-size // 32) * 32
        d.min_size = d.max_size = size
        d.canvas_size = (canvas, canvas)
    # A few thousand images at most: a short schedule with the 1x recipe's shape.
    c.train.num_steps = 3000
    c.train.global_batch_size = 8
    c.train.warmup_steps = 200
    c.train.checkpoint_every_steps = 500
    return c
