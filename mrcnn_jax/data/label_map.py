"""The label map: model label (1..num_classes-1; 0 = background) <-> dataset category id <-> name.

One object decides it for a run, from the data's categories and `model.num_classes`, and training
writes it to `WORKDIR/label_map.json`; the input pipeline (category id -> gt class), the
evaluation (label -> category id in the COCO results), `predict.py` and the export (names in the
pictures and the json) all read that one map.

    label_map, notes = label_map_for_data(categories, used_category_ids, num_classes)
    label_map.save(workdir)                  # WORKDIR/label_map.json
    label_map = LabelMap.load(workdir)       # or a path to the json

Two layouts, chosen by `model.num_classes`:
- contiguous (the default): the categories some annotation uses, in category-id order, take labels
  1..K and num_classes = K + 1. `model.num_classes = 0` takes K + 1 from the data.
- category ids as labels: num_classes = 91 and the ids lie in 1..90 (torchvision's COCO
  convention: 91 outputs indexed by COCO category id, which lets COCO-trained weights of either
  project be read by the other).
Any other `num_classes` contradicts the data and fails before anything is built.

Categories no annotation of any split uses (Roboflow's parent class, id 0, in nearly every export)
get no label: a class the model could never learn only dilutes its softmax. Names that repeat are
made unique by appending the category id (`facade (id 0)`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mrcnn_jax import paths

LABEL_MAP_FILE = "label_map.json"
CONTIGUOUS = "contiguous"
CATEGORY_IDS = "category_ids"
# model.num_classes = 0: the number of classes comes from the data.
NUM_CLASSES_FROM_DATA = 0
# torchvision's COCO head: 91 outputs, indexed by COCO category id (1..90).
TORCHVISION_COCO_NUM_CLASSES = 91


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """label -> (category id, name) for labels 1..; label 0 is the background.

    labels, category_ids, names: [K] each, in label order.
    """

    num_classes: int  # model outputs, background included
    labels: tuple[int, ...]
    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    layout: str = CONTIGUOUS

    def __post_init__(self):
        if not (len(self.labels) == len(self.category_ids) == len(self.names)):
            raise ValueError("labels, category_ids and names must have one entry per class")
        if any(label < 1 or label >= self.num_classes for label in self.labels):
            raise ValueError(f"labels {list(self.labels)} must lie in 1..{self.num_classes - 1} "
                             f"(0 is the background)")
        for what, values in (("labels", self.labels), ("category ids", self.category_ids),
                             ("names", self.names)):
            if len(set(values)) != len(values):
                repeated = sorted({v for v in values if values.count(v) > 1})
                raise ValueError(f"label map: repeated {what} {repeated}")

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return dict(zip(self.labels, self.category_ids))

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return dict(zip(self.category_ids, self.labels))

    @property
    def label_names(self) -> dict[int, str]:
        return dict(zip(self.labels, self.names))

    def category_to_label_table(self) -> np.ndarray:
        """[max category id + 1] int32: entry c is the label of category c, 0 when c has none
        (the input pipeline drops such instances)."""
        table = np.zeros(max(self.category_ids) + 1, np.int32)
        table[list(self.category_ids)] = self.labels
        return table

    def describe(self) -> str:
        """One line per class, for the log."""
        return "\n".join(f"  label {label}: category id {cid} {name!r}"
                         for label, cid, name in zip(self.labels, self.category_ids, self.names))

    def to_json(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "layout": self.layout,
                "labels": [{"label": label, "category_id": cid, "name": name}
                           for label, cid, name in zip(self.labels, self.category_ids,
                                                       self.names)]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "label map") -> LabelMap:
        try:
            entries = sorted(data["labels"], key=lambda e: int(e["label"]))
            return cls(num_classes=int(data["num_classes"]),
                       labels=tuple(int(e["label"]) for e in entries),
                       category_ids=tuple(int(e["category_id"]) for e in entries),
                       names=tuple(str(e["name"]) for e in entries),
                       layout=str(data.get("layout", CONTIGUOUS)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a label map ({type(e).__name__}: {e}); expected "
                             f'{{"num_classes": N, "labels": [{{"label", "category_id", '
                             f'"name"}}, ...]}}') from e

    def save(self, directory: str | os.PathLike) -> str:
        """Write `directory/label_map.json`; returns its path."""
        path = paths.resolve(directory) / LABEL_MAP_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return os.fspath(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelMap:
        """From a label_map.json, or a directory holding one."""
        path = paths.resolve(path)
        if path.is_dir():
            path = path / LABEL_MAP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"label map not found: {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from e
        return cls.from_json(data, os.fspath(path))


def unique_names(ids: Sequence[int], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names with every repeated one made unique as 'name (id N)', one note per renaming)."""
    counts = collections.Counter(names)
    out, notes = [], []
    for cid, name in zip(ids, names):
        if counts[name] > 1:
            new = f"{name} (id {cid})"
            notes.append(f"category id {cid}: name {name!r} is used by {counts[name]} categories; "
                         f"it is called {new!r}")
            name = new
        out.append(name)
    if len(set(out)) != len(out):  # 'a (id 1)' may itself have been a category's name
        raise ValueError(f"category names {list(names)} cannot be made unique")
    return out, notes


def label_map_for_data(
    categories: Iterable[tuple[int, str]],
    used_category_ids: Iterable[int] | None,
    num_classes: int,
) -> tuple[LabelMap, list[str]]:
    """The label map of a data set for `model.num_classes` (see the module docstring).

    Args:
      categories: (category id, name) of every category of the data.
      used_category_ids: the ids some annotation of some split uses (None: all are used).
      num_classes: `model.num_classes` (background included), or 0 to take it from the data.

    Returns (label map, notes for the log: unused categories, renamings, where num_classes came
    from). Raises ValueError naming both numbers when `num_classes` contradicts the data.
    """
    categories = sorted((int(c), str(n)) for c, n in categories)
    if not categories:
        raise ValueError("the data has no categories")
    used = {c for c, _ in categories} if used_category_ids is None else {
        int(c) for c in used_category_ids}
    notes = []
    unused = [(c, n) for c, n in categories if c not in used]
    kept = [(c, n) for c, n in categories if c in used]
    if unused:
        notes.append("categories no annotation uses get no label: " + ", ".join(
            f"id {c} {n!r}" for c, n in unused))
    if not kept:
        raise ValueError("no annotation uses any of the categories "
                         f"{[c for c, _ in categories]}: nothing to train or evaluate")
    ids = [c for c, _ in kept]
    names, renamed = unique_names(ids, [n for _, n in kept])
    notes += renamed
    k = len(kept)
    if num_classes == NUM_CLASSES_FROM_DATA:
        notes.append(f"model.num_classes = {k + 1} from the data ({k} classes + background)")
        num_classes = k + 1
    if num_classes == k + 1:
        return LabelMap(num_classes, tuple(range(1, k + 1)), tuple(ids), tuple(names)), notes
    if num_classes == TORCHVISION_COCO_NUM_CLASSES and min(ids) >= 1 and max(ids) < num_classes:
        notes.append(f"model.num_classes = {num_classes}: labels are category ids "
                     f"(torchvision's COCO convention)")
        return LabelMap(num_classes, tuple(ids), tuple(ids), tuple(names), CATEGORY_IDS), notes
    raise ValueError(
        f"model.num_classes = {num_classes} contradicts the data: it has {k} classes (+ "
        f"background = {k + 1}) with category ids {ids[0]}..{ids[-1]}; set "
        f"--config.model.num_classes={k + 1}, or 0 to take it from the data")


def coco_label_map(category_ids: Sequence[int], names: Sequence[str]) -> LabelMap:
    """torchvision's COCO head: 91 outputs indexed by COCO category id."""
    return LabelMap(TORCHVISION_COCO_NUM_CLASSES, tuple(int(c) for c in category_ids), tuple(int(c) for c in category_ids),
                    tuple(names), CATEGORY_IDS)
