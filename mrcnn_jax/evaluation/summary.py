"""Pretty printing of the metrics dict of `CocoEvaluator.evaluate`.

The dict holds fractions and -1.0 for "undefined" (pycocotools' conventions); the tables print
percent with one decimal (detectron2's habit) and "-" where a metric is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mrcnn_jax.evaluation.coco_evaluator import IOU_TYPES, PER_CATEGORY_PREFIX, metric_names

# Widths of the printed tables.
_TYPE_WIDTH = 10
_VALUE_WIDTH = 6
_PER_CATEGORY_COLUMNS = 3
_NAME_WIDTH = 20


def format_value(value: float) -> str:
    """A metric in percent with one decimal, or "-" for pycocotools' -1 (undefined) and NaN."""
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{100.0 * value:.1f}"


def iou_types_in(metrics: Mapping[str, float]) -> tuple[str, ...]:
    """The iou types present in `metrics`, in the order bbox, segm, keypoints."""
    present = {k.split("/", 1)[0] for k in metrics}
    return tuple(t for t in IOU_TYPES if t in present)


def format_summary(metrics: Mapping[str, float], iou_types: tuple[str, ...] | None = None) -> str:
    """The standard summary numbers, one row per iou type (percent).

    Example:
        type      |   AP   AP50  ...
        bbox      |  37.9  59.2  ...
    bbox/segm rows have 12 columns; keypoints has its own 10-column header.
    """
    iou_types = iou_types_in(metrics) if iou_types is None else iou_types
    lines = []
    last_header = None
    for iou_type in iou_types:
        names = metric_names(iou_type)
        header = f"{'(%)':<{_TYPE_WIDTH}}|" + "".join(f"{n:>{_VALUE_WIDTH}}" for n in names)
        if header != last_header:
            lines.append(header)
            lines.append("-" * len(header))
            last_header = header
        values = "".join(
            f"{format_value(metrics.get(f'{iou_type}/{n}', float('nan'))):>{_VALUE_WIDTH}}"
            for n in names)
        lines.append(f"{iou_type:<{_TYPE_WIDTH}}|{values}")
    return "\n".join(lines)


def per_category(metrics: Mapping[str, float], iou_type: str) -> dict[str, float]:
    """{category name: AP} of `iou_type` from the flat metrics dict."""
    prefix = f"{iou_type}/{PER_CATEGORY_PREFIX}"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def format_per_category(metrics: Mapping[str, float], iou_type: str,
                        columns: int = _PER_CATEGORY_COLUMNS) -> str:
    """The per-category AP of `iou_type` as a table of `columns` (name, AP) pairs per row."""
    table = list(per_category(metrics, iou_type).items())
    if not table:
        return ""
    width = max(_NAME_WIDTH, max(len(name) for name, _ in table) + 1)
    cell = width + _VALUE_WIDTH + 3
    header = "".join(f"{'category':<{width}}{'AP':>{_VALUE_WIDTH}}   " for _ in
                     range(min(columns, len(table))))
    lines = [f"{iou_type} per-category AP (%)", header.rstrip(), "-" * (min(columns, len(table))
                                                                      * cell - 3)]
    for start in range(0, len(table), columns):
        row = table[start:start + columns]
        lines.append("".join(f"{name:<{width}}{format_value(ap):>{_VALUE_WIDTH}}   "
                             for name, ap in row).rstrip())
    return "\n".join(lines)


def format_report(metrics: Mapping[str, float]) -> str:
    """The summary of every iou type in `metrics`, then each type's per-category table."""
    parts = [format_summary(metrics)]
    for iou_type in iou_types_in(metrics):
        table = format_per_category(metrics, iou_type)
        if table:
            parts.append(table)
    return "\n\n".join(parts)
