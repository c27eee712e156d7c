"""tfds builder for COCO-format instance segmentation with masks (and keypoints).

tfds' own `coco/2017` has boxes but no instance masks. This builder stores, per image:

    image              the source JPEG/PNG bytes (other formats/modes are re-encoded as RGB PNG)
    image/id           int64, the json's image id
    image/filename     text
    objects            a sequence, one entry per usable annotation (crowd ones included):
      id               int64 annotation id
      bbox             tfds BBoxFeature: normalised (ymin, xmin, ymax, xmax), clipped to the image
      label            ClassLabel, 0-based index of the category in id order (tfds' own view;
                       the pipeline's gt class comes from category_id through the label map)
      category_id      int64, the json's category id
      is_crowd         bool
      area             float32, the json's `area` (COCO evaluation's area ranges use it)
      mask_area        int64, pixels of the decoded mask (== pycocotools annToMask().sum())
      mask_box         int32 [4] x1, y1, x2, y2 (exclusive) of the tight box of the mask pixels
      mask_png         the mask cropped to `mask_box`, PNG bytes of a uint8 {0, 1} image
      keypoints        float32 [K, 3] (x, y, visibility), only in configs with keypoints

Masks are stored cropped to their own pixels and PNG-encoded, so the input pipeline decodes them
with `tf.io.decode_png` (no `py_function`) and never materialises full-image masks: the crop is
all the information (a mask is zero outside its tight box).

Metadata (`builder.info.metadata`): `category_ids` and `category_names` (every category, in id
order), `used_category_ids` (those some annotation of some split uses), `keypoint_names`,
`keypoint_flip` (left/right permutation) and `bad_data` (per split, the counts of skipped records
by reason, see `coco_json`). `label_map_for_info(info, model.num_classes)` gives the label map
(`label_map.py`) the pipeline, the evaluation and the predictor share.

Configs:
- `2017`: the official COCO 2017 train/val. Put `train2017.zip`, `val2017.zip` and
  `annotations_trainval2017.zip` in the manual dir, or their extracted folders (`train2017/`,
  `val2017/`, `annotations/instances_train2017.json`, ...). Person keypoints are merged from
  `person_keypoints_*.json` by annotation id (the files are found and read by `coco2017`).
- any local COCO-format data set: `coco_format_config(name, {"train": (images_dir, json), ...})`,
  then `CocoInstances(config=that, data_dir=...)`. `get_builder(config.data)` does both from the
  config fields.

`ground_truth_dataset(config.data, split)` reads the same source files as the COCO ground-truth
dict of the evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import zipfile
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mrcnn_jax import paths
from mrcnn_jax.data import coco2017, coco_json, label_map

_VERSION = tfds.core.Version("1.0.0")
# Formats tf.io.decode_image handles as 3-D images; anything else is re-encoded as PNG.
_DIRECT_FORMATS = ("JPEG", "PNG")
_DIRECT_MODES = ("RGB", "L")

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """`year` set: the official COCO files from the manual dir. Else `splits` gives, per split
    name, (images folder, annotations json) of a local COCO-format data set."""

    year: str = ""
    splits: tuple[tuple[str, str, str], ...] = ()
    num_keypoints: int = 0


def coco_format_config(
    name: str, splits: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]]
) -> CocoInstancesConfig:
    """Config for a local COCO-format data set: `splits` maps split name -> (images, json).

    The config name is `name` plus a hash of the paths and the json files' sizes and mtimes, so
    a changed data set is rebuilt rather than silently read from a stale tfds copy. The number of
    keypoints comes from the categories' `keypoints` names (0: no keypoint feature).
    """
    if not splits:
        raise ValueError("splits must name at least one (images, annotations) pair")
    resolved = []
    digest = hashlib.sha1()
    num_keypoints = None
    for split, (images, annotations) in sorted(splits.items()):
        images, annotations = pathlib.Path(images), pathlib.Path(annotations)
        if not images.is_dir():
            raise FileNotFoundError(f"{split} images folder not found: {images}")
        index = coco_json.load_index(annotations, field=f"{split} annotations")
        k = len(index.keypoint_names)
        if num_keypoints is not None and k != num_keypoints:
            raise ValueError(f"{annotations}: {k} keypoints per instance, other splits have "
                             f"{num_keypoints}")
        num_keypoints = k
        st = annotations.stat()
        digest.update(f"{split}|{images.resolve()}|{annotations.resolve()}|{st.st_size}|"
                      f"{st.st_mtime_ns}".encode())
        resolved.append((split, str(images.resolve()), str(annotations.resolve())))
    safe = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name) or "local"
    return CocoInstancesConfig(
        name=f"{safe}_{digest.hexdigest()[:8]}", version=_VERSION, splits=tuple(resolved),
        num_keypoints=num_keypoints or 0,
        description=f"local COCO-format data set {name!r}: {resolved}")


class _ImageSource:
    """Image files of one split, from a folder or from a zip (members under `prefix/`)."""

    def __init__(self, path: pathlib.Path, prefix: str = ""):
        self.path = path
        self.prefix = prefix
        self._zip = zipfile.ZipFile(path) if path.suffix == ".zip" else None
        self._index: dict[str, list[pathlib.Path]] | None = None

    def read(self, file_name: str) -> tuple[bytes | None, str | None]:
        """(the file's bytes or None when absent, the path it was found at when that is not
        `file_name`). A name the folder lacks is looked up by its base name in the subfolders:
        exports often nest images one level deeper than the json says."""
        if self._zip is not None:
            try:
                name = f"{self.prefix}/{file_name}" if self.prefix else file_name
                return self._zip.read(name), None
            except KeyError:
                return None, None
        p = self.path / file_name
        if p.is_file():
            return p.read_bytes(), None
        found = self._by_base_name().get(pathlib.PurePath(file_name).name, [])
        if len(found) != 1:  # absent, or ambiguous: several files of that name
            return None, None
        return found[0].read_bytes(), os.fspath(found[0].relative_to(self.path))

    def _by_base_name(self) -> dict[str, list[pathlib.Path]]:
        if self._index is None:
            self._index = {}
            for f in sorted(self.path.rglob("*")):
                if f.is_file():
                    self._index.setdefault(f.name, []).append(f)
        return self._index

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _coco2017_sources(manual_dir: pathlib.Path, split: str):
    """(image source, validated index with the person keypoints merged) of an official split."""
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"data.manual_dir: COCO manual dir not found: {manual_dir}")
    split_dir = coco2017.split_dir(split)
    folder, zipped = manual_dir / split_dir, manual_dir / f"{split_dir}.zip"
    if folder.is_dir():
        images = _ImageSource(folder)
    elif zipped.is_file():
        images = _ImageSource(zipped, prefix=split_dir)
    else:
        raise FileNotFoundError(f"data.manual_dir: neither {folder}/ nor {zipped} exists")
    data, where = coco2017.read_annotations(manual_dir, split, require_keypoints=True)
    return images, coco_json.build_index(data, where)


def _mask_png(crop: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="PNG")
    return buf.getvalue()


def _checked_image_bytes(data: bytes, image: dict, where: str,
                         report: coco_json.BadDataReport) -> bytes | None:
    """The image bytes to store, or None (counted) when unreadable or of the wrong size."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: catches truncated files, not just bad headers
            fmt, mode, size = im.format, im.mode, im.size
            if fmt not in _DIRECT_FORMATS or mode not in _DIRECT_MODES:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                data = buf.getvalue()
    except Exception as e:  # PIL raises many types for corrupt data
        report.add(coco_json.CORRUPT_IMAGE, f"{where}: {type(e).__name__}: {e}")
        return None
    if size != (image["width"], image["height"]):
        report.add(coco_json.IMAGE_SIZE_MISMATCH,
                   f"{where}: file is {size[0]}x{size[1]}, json says "
                   f"{image['width']}x{image['height']}")
        return None
    return data


class CocoInstances(tfds.core.GeneratorBasedBuilder):
    """COCO-format instance segmentation with cropped PNG masks (see the module docstring)."""

    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        CocoInstancesConfig(
            name="2017", version=_VERSION, year="2017", num_keypoints=coco2017.NUM_KEYPOINTS,
            description="COCO 2017 train/val instances with masks and person keypoints."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download train2017.zip, val2017.zip and annotations_trainval2017.zip from "
        "https://cocodataset.org/#download into the manual dir (or extract them there).")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> pathlib.Path:  # noqa: D102
        # tfds derives this through importlib.resources of the top-level package, which fails
        # for an editable install imported as a namespace package; the file's folder is enough.
        return pathlib.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        objects = {
            "id": np.int64,
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(),
            "category_id": np.int64,
            "is_crowd": np.bool_,
            "area": np.float32,
            "mask_area": np.int64,
            "mask_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            "mask_png": tfds.features.Tensor(shape=(), dtype=np.object_),
        }
        if self.builder_config.num_keypoints:
            objects["keypoints"] = tfds.features.Tensor(
                shape=(self.builder_config.num_keypoints, 3), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": np.int64,
                "image/filename": tfds.features.Text(),
                "objects": tfds.features.Sequence(objects),
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg = self.builder_config
        sources = {}
        if cfg.year:
            for split in coco2017.SPLIT_DIRS:
                sources[split] = _coco2017_sources(pathlib.Path(dl_manager.manual_dir), split)
        else:
            for split, images, annotations in cfg.splits:
                if not pathlib.Path(images).is_dir():
                    raise FileNotFoundError(f"{split} images folder not found: {images}")
                sources[split] = (_ImageSource(pathlib.Path(images)),
                                  coco_json.load_index(annotations, f"{split} annotations"))
        # One label space for all splits: the categories must agree.
        first_split, (_, first) = next(iter(sources.items()))
        for split, (_, index) in sources.items():
            if index.category_ids != first.category_ids:
                raise ValueError(
                    f"{index.path}: categories {index.category_ids} differ from those of the "
                    f"{first_split} split {first.category_ids} ({first.path})")
            if len(index.keypoint_names) != cfg.num_keypoints:
                raise ValueError(f"{index.path}: {len(index.keypoint_names)} keypoint names, "
                                 f"the config expects {cfg.num_keypoints}")
        # tfds wants unique class names; the label map (label_map.py) applies the same renaming.
        unique, _ = label_map.unique_names(first.category_ids, first.category_names)
        self.info.features["objects"]["label"].names = unique
        used = sorted({int(ann["category_id"]) for _, index in sources.values()
                       for anns in index.annotations_by_image.values() for _, ann in anns})
        self.info.metadata.update(
            category_ids=list(first.category_ids),
            category_names=list(first.category_names),
            used_category_ids=[c for c in used if c in set(first.category_ids)],
            keypoint_names=list(first.keypoint_names),
            keypoint_flip=coco_json.keypoint_flip_indices(first.keypoint_names),
            bad_data={},
        )
        return {split: self._generate_examples(split, images, index)
                for split, (images, index) in sources.items()}

    def _generate_examples(self, split: str, images: _ImageSource, index: coco_json.CocoIndex):
        report = coco_json.BadDataReport(f"{self.builder_config.name}/{split} ({index.path})")
        coco_json.count_orphan_annotations(index, report)
        num_kp = self.builder_config.num_keypoints
        try:
            for image in index.images:
                where = f"{index.path} image id {image['id']} ({image['file_name']})"
                data, found_at = images.read(image["file_name"])
                if data is None:
                    report.add(coco_json.MISSING_IMAGE_FILE, where)
                    continue
                if found_at:
                    report.add(coco_json.IMAGE_IN_SUBFOLDER, f"{where} -> {found_at}")
                data = _checked_image_bytes(data, image, where, report)
                if data is None:
                    continue
                h, w = image["height"], image["width"]
                instances = coco_json.convert_image_annotations(index, image, report)
                objects = []
                for inst in instances:
                    x1, y1, x2, y2 = inst.box
                    obj = {
                        "id": inst.annotation_id,
                        "bbox": tfds.features.BBox(ymin=y1 / h, xmin=x1 / w, ymax=y2 / h,
                                                   xmax=x2 / w),
                        "label": inst.label - 1,
                        "category_id": inst.category_id,
                        "is_crowd": inst.is_crowd,
                        "area": inst.area,
                        "mask_area": inst.mask_area,
                        "mask_box": inst.mask_box,
                        "mask_png": _mask_png(inst.mask_crop),
                    }
                    if num_kp:
                        obj["keypoints"] = inst.keypoints
                    objects.append(obj)
                yield image["id"], {
                    "image": data,
                    "image/id": image["id"],
                    "image/filename": image["file_name"],
                    "objects": objects,
                }
        finally:
            images.close()
        self.info.metadata["bad_data"][split] = report.as_dict()
        (log.warning if report.counts else log.info)("%s", report.summary())


def label_map_for_info(info: tfds.core.DatasetInfo,
                       num_classes: int) -> tuple[label_map.LabelMap, list[str]]:
    """The data set's label map for `model.num_classes` and its notes for the log
    (`label_map.label_map_for_data`). Data prepared before `used_category_ids` was recorded
    count every category as used."""
    m = info.metadata
    return label_map.label_map_for_data(zip(m["category_ids"], m["category_names"]),
                                        m.get("used_category_ids"), num_classes)


def _check_local_source(data_config, field: str) -> None:
    """The builder reads its sources with the OS: a bucket URL there is an error naming it."""
    if data_config.get(field) and paths.is_url(data_config[field]):
        raise ValueError(
            f"data.{field}={data_config[field]!r}: the data set is prepared from local files "
            f"only; prepare it once from a local copy into data.data_dir (which may be a bucket, "
            f"e.g. gs://...), then train with that data_dir")


def get_builder(data_config, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """The builder for `config.data` (`dataset`, `data_dir`, `manual_dir`, paths); prepared.

    `data.dataset` is 'coco_instances/2017' or 'coco_format' (then `data.train_images`,
    `data.train_annotations`, `data.eval_images`, `data.eval_annotations` and
    `data.dataset_name` describe the local data set). With a `data.shapes` section the synthetic
    shapes set is generated first if missing (`mrcnn_jax.data.shapes.ensure_generated`), with a
    `data.keypoint_shapes` section the stick figures (`mrcnn_jax.data.keypoint_shapes`).

    Preparing COCO takes a while (every image is checked and every mask encoded, in one
    process); on several hosts, prepare once into a shared `data_dir` before training starts.
    """
    # TFDS reads and writes data_dir through gfile: a bucket (gs://...) works as it is.
    data_dir = os.fspath(paths.resolve(data_config.data_dir)) if data_config.data_dir else None
    if "shapes" in data_config and data_config.shapes is not None:
        from mrcnn_jax.data import shapes

        s = data_config.shapes
        shapes.ensure_generated(s.root, s.num_train, s.num_val, s.size, s.seed)
    if data_config.get("keypoint_shapes") is not None:
        from mrcnn_jax.data import keypoint_shapes

        s = data_config.keypoint_shapes
        keypoint_shapes.ensure_generated(s.root, s.num_train, s.num_val, s.size, s.seed)
    if data_config.dataset == "coco_format":
        for field in ("train_images", "train_annotations", "eval_images", "eval_annotations"):
            _check_local_source(data_config, field)
        splits = {}
        for split, images, ann in (
            (data_config.train_split, data_config.train_images, data_config.train_annotations),
            (data_config.eval_split, data_config.eval_images, data_config.eval_annotations),
        ):
            if images or ann:
                if not (images and ann):
                    raise ValueError(f"data: the {split} split needs both an images folder and "
                                     f"an annotations json, got {images!r} and {ann!r}")
                splits[split] = (images, ann)
        if not splits:
            raise ValueError("data.dataset='coco_format' needs data.train_images/"
                             "train_annotations (and/or eval_*) to be set")
        config = coco_format_config(data_config.get("dataset_name", "") or "local", splits)
        builder = CocoInstances(config=config, data_dir=data_dir)
    elif data_config.dataset.startswith("coco_instances/"):
        builder = tfds.builder(data_config.dataset, data_dir=data_dir)
    else:
        raise ValueError(f"data.dataset must be 'coco_instances/2017' or 'coco_format', got "
                         f"{data_config.dataset!r}")
    if prepare and not builder.is_prepared():
        _check_local_source(data_config, "manual_dir")
        if data_config.manual_dir and not os.path.isdir(data_config.manual_dir):
            raise FileNotFoundError(
                f"data.manual_dir: folder not found: {data_config.manual_dir} "
                f"({CocoInstances.MANUAL_DOWNLOAD_INSTRUCTIONS})")
        download_config = tfds.download.DownloadConfig(
            manual_dir=data_config.manual_dir or None)
        builder.download_and_prepare(download_config=download_config)
    return builder


def ground_truth_dataset(data_config, split: str) -> dict:
    """The COCO ground-truth dict of `split` for `config.data`, read from the original files.

    The evaluation scores against these files rather than the tfds records, so crowd regions,
    areas and segmentations are exactly pycocotools'. coco_format data sets:
    `data.eval_annotations` (or `data.train_annotations` for the train split). COCO 2017: the
    instances of `data.manual_dir` with the person keypoints merged in (`coco2017`).
    Paths may be local or in a bucket.
    """
    d = data_config
    if d.dataset == "coco_format":
        if split == d.eval_split and d.eval_annotations:
            return coco_json.load_json(d.eval_annotations, "data.eval_annotations")
        if split == d.train_split and d.train_annotations:
            return coco_json.load_json(d.train_annotations, "data.train_annotations")
        raise ValueError(f"split {split!r}: data.dataset='coco_format' has annotations for "
                         f"{d.train_split!r} (data.train_annotations) and {d.eval_split!r} "
                         "(data.eval_annotations) only")
    if d.dataset.startswith("coco_instances/"):
        if not d.manual_dir:
            raise ValueError("data.manual_dir must name the folder with the COCO annotations "
                             "(the ground truth of the evaluation)")
        return coco2017.read_annotations(d.manual_dir, split)[0]
    raise ValueError(f"data.dataset must be 'coco_instances/2017' or 'coco_format', got "
                     f"{d.dataset!r}")
