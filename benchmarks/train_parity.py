"""Training side by side with torchvision on real photos: same model, same initial weights, same
batches in the same order, same schedule; losses and test-split AP per seed.

    .venv/bin/python benchmarks/train_parity.py [--config configs/breadcrumb.py] [--seeds 0,1,2]
        [--steps 2400] [--sides ours,torchvision] [--threads 2]

Model: the config's (configs/breadcrumb.py: the demo's from-scratch ResNet-FPN, width 8 with one
bottleneck per stage, on BreadCrumb at 384 px), built on the torchvision side from its own
parts (Bottleneck, FrozenBatchNorm2d, BackboneWithFPN, MaskRCNN with the config's anchors,
sampling budgets, heads and thresholds). Per seed, torchvision's random initialisation is written
once to a .pth that both sides load (`train.init_from` on ours, with every layer fitting).
Batches: this project's input pipeline (config seed, horizontal flips off) feeds both; the
torchvision side gets the same normalised canvases, boxes and labels, and full-canvas masks
pasted from the pipeline's cropped ones, and runs its backbone, RPN and RoI heads on them
directly (its resize transform is bypassed: the images are already resized). Schedule: SGD with
momentum, weight decay, linear warmup, step decay and gradient clipping of the config, on both.
Evaluation: the config's eval split through this project's COCO evaluation, the torchvision
model's 28x28 mask probabilities and boxes going through the same pasting and pycocotools.

Writes benchmarks/results/train_parity.json (per side and seed: loss curve, bbox/segm AP, wall
time) and benchmarks/results/train_parity.png (mean loss curves), prints a table and ends with
`train_parity: ours_segm_AP=<mean> tv_segm_AP=<mean> tv_spread=<max - min> ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_config(path: str, seed: int, steps: int, data_dir: str):
    import runpy

    config_path, _, arg = path.partition(":")
    config = runpy.run_path(str(ROOT / config_path))["get_config"](arg or None)
    config.data.hflip_prob = 0.0  # augmentation off: both sides see identical batches
    config.data.data_dir = data_dir
    config.train.seed = seed
    config.train.num_steps = steps
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = steps
    config.eval.num_vis = 0
    # model.num_classes from the data, as training resolves it: the torchvision side needs it.
    from mrcnn_jax.data import coco_instances

    builder = coco_instances.get_builder(config.data)
    label_map, _ = coco_instances.label_map_for_info(builder.info, config.model.num_classes)
    config.model.num_classes = label_map.num_classes
    return config


# --- torchvision side --------------------------------------------------------------------------

def build_torchvision_model(torch, config):
    """torchvision's MaskRCNN with the config's tiny ResNet-FPN and heads (module names as
    torchvision's own, so the import map reads its state_dict)."""
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.misc import FrozenBatchNorm2d

    m = config.model
    if m.backbone != "resnet_tiny" or m.architecture != "fpn":
        raise ValueError("train_parity builds the tiny ResNet-FPN only (model.backbone = "
                         f"'resnet_tiny'), got {m.backbone!r} / {m.architecture!r}")
    width, stages = 8, (1, 1, 1, 1)  # modeling/backbone/resnet.py's ResNetTiny

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = FrozenBatchNorm2d(width, eps=0.0)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = width
            for i, blocks in enumerate(stages):
                planes, stride = width * 2 ** i, 1 if i == 0 else 2
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                    FrozenBatchNorm2d(planes * 4, eps=0.0))
                layers = [Bottleneck(inplanes, planes, stride, downsample,
                                     norm_layer=lambda c: FrozenBatchNorm2d(c, eps=0.0))]
                inplanes = planes * 4
                layers += [Bottleneck(inplanes, planes,
                                      norm_layer=lambda c: FrozenBatchNorm2d(c, eps=0.0))
                           for _ in range(blocks - 1)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*layers))

    body = TinyResNet()
    channels = [width * 2 ** i * 4 for i in range(4)]
    backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, channels,
                               m.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes),
                              (tuple(m.anchor_aspect_ratios),) * len(m.anchor_sizes))
    levels = ["0", "1", "2", "3"]
    fc = m.fpn_channels
    model = MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_nms_thresh=m.rpn_nms_thresh, rpn_fg_iou_thresh=m.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=m.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        rpn_positive_fraction=m.rpn_positive_fraction, rpn_score_thresh=m.rpn_score_thresh,
        box_roi_pool=MultiScaleRoIAlign(levels, m.box_pool_size, m.pooler_sampling_ratio),
        box_head=TwoMLPHead(fc * m.box_pool_size ** 2, m.box_head_dim),
        box_predictor=FastRCNNPredictor(m.box_head_dim, m.num_classes),
        box_score_thresh=m.box_score_thresh, box_nms_thresh=m.box_nms_thresh,
        box_detections_per_img=m.detections_per_img,
        box_fg_iou_thresh=m.box_fg_iou_thresh, box_bg_iou_thresh=m.box_bg_iou_thresh,
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_positive_fraction=m.box_positive_fraction,
        mask_roi_pool=MultiScaleRoIAlign(levels, m.mask_pool_size, m.pooler_sampling_ratio),
        mask_head=MaskRCNNHeads(fc, list(m.mask_head_layers), 1),
        mask_predictor=MaskRCNNPredictor(m.mask_head_layers[-1], m.mask_head_layers[-1],
                                         m.num_classes))
    return model


def paste_masks(masks: np.ndarray, regions: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[N, S, S] {0, 1} crops over regions [N, 4] (x1, y1, x2, y2) -> [N, H, W] uint8 masks,
    each canvas pixel centre sampling its nearest crop cell."""
    n, s = masks.shape[0], masks.shape[1]
    out = np.zeros((n, *hw), np.uint8)
    ys, xs = np.arange(hw[0]) + 0.5, np.arange(hw[1]) + 0.5
    for i in range(n):
        x1, y1, x2, y2 = regions[i]
        if x2 <= x1 or y2 <= y1:
            continue
        row = np.floor((ys - y1) / (y2 - y1) * s).astype(int)
        col = np.floor((xs - x1) / (x2 - x1) * s).astype(int)
        rok, cok = (row >= 0) & (row < s), (col >= 0) & (col < s)
        out[i][np.ix_(rok, cok)] = masks[i][np.ix_(row[rok], col[cok])]
    return out


def torch_learning_rate(config, step: int) -> float:
    from mrcnn_jax.train_lib import learning_rate

    return float(learning_rate(config.train)(step))


def run_torchvision(config, init_path: str, threads: int) -> dict:
    import torch
    from torchvision.models.detection.image_list import ImageList

    from mrcnn_jax.data import device_transform, input_pipeline
    from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation

    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    model = build_torchvision_model(torch, config)
    model.load_state_dict(torch.load(init_path))
    t, d = config.train, config.data
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    batches = input_pipeline.make_train_iterator(config, 0)
    curve, start = [], time.time()
    model.train()
    for step in range(t.num_steps):
        # The training batch carries uint8 pixels and resize taps: the canvas the model sees.
        batch = device_transform.unpack_masks(next(batches))
        batch["gt_masks"] = np.asarray(batch["gt_masks"])
        batch["image"] = np.asarray(device_transform.canvas_batch(batch, d.pixel_mean,
                                                                  d.pixel_std)["image"])
        images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        sizes = [tuple(int(v) for v in hw) for hw in batch["image_size"]]
        targets = []
        for i in range(images.shape[0]):
            valid = batch["gt_valid"][i]
            targets.append({
                "boxes": torch.from_numpy(batch["gt_boxes"][i][valid]),
                "labels": torch.from_numpy(batch["gt_classes"][i][valid].astype(np.int64)),
                "masks": torch.from_numpy(paste_masks(batch["gt_masks"][i][valid],
                                                      batch["gt_mask_boxes"][i][valid],
                                                      tuple(d.canvas_size)))})
        image_list = ImageList(images, sizes)
        features = model.backbone(image_list.tensors)
        proposals, rpn_losses = model.rpn(image_list, features, targets)
        _, roi_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
        losses = {**rpn_losses, **roi_losses}
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = torch_learning_rate(config, step)
        optimizer.zero_grad()
        loss.backward()
        if t.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip_norm)
        optimizer.step()
        if (step + 1) % t.log_every_steps == 0 or step + 1 == t.num_steps:
            curve.append((step + 1, float(loss)))
            print(f"torchvision seed {t.seed} step {step + 1} loss {float(loss):.4f}",
                  flush=True)
    train_s = time.time() - start
    model.eval()
    detections_per_img = config.model.detections_per_img

    def predict(_, images, image_sizes):
        images = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        sizes = [tuple(int(v) for v in hw) for hw in np.asarray(image_sizes)]
        with torch.no_grad():
            image_list = ImageList(images, sizes)
            features = model.backbone(image_list.tensors)
            proposals, _ = model.rpn(image_list, features)
            dets, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        b, m = len(dets), config.model.mask_resolution
        out = {"boxes": np.zeros((b, detections_per_img, 4), np.float32),
               "scores": np.zeros((b, detections_per_img), np.float32),
               "labels": np.zeros((b, detections_per_img), np.int32),
               "valid": np.zeros((b, detections_per_img), bool),
               "mask_probs": np.zeros((b, detections_per_img, m, m), np.float32)}
        for i, det in enumerate(dets):
            n = len(det["scores"])
            out["boxes"][i, :n] = det["boxes"].numpy()
            out["scores"][i, :n] = det["scores"].numpy()
            out["labels"][i, :n] = det["labels"].numpy()
            out["valid"][i, :n] = True
            out["mask_probs"][i, :n] = det["masks"][:, 0].numpy()
        return out

    evaluation = CocoEvaluation(config, predict_fn=predict)
    metrics = evaluation.run(None)
    return {"curve": curve, "train_s": train_s, "bbox_AP": metrics["bbox/AP"],
            "segm_AP": metrics["segm/AP"]}


# --- this project's side -----------------------------------------------------------------------

def run_ours(config, init_path: str, workdir: str) -> dict:
    import tensorflow as tf

    from mrcnn_jax import train_lib

    config.train.init_from = init_path
    start = time.time()
    result = train_lib.train_and_evaluate(config, workdir)
    train_s = time.time() - start
    curve = []
    for events in sorted(pathlib.Path(workdir, "train").glob("events.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == "loss":
                    curve.append((int(event.step), float(tf.make_ndarray(value.tensor))))
    return {"curve": sorted(curve), "train_s": train_s,
            "bbox_AP": result["eval"]["bbox/AP"], "segm_AP": result["eval"]["segm/AP"]}


def write_init(config, path: str) -> None:
    import torch

    torch.manual_seed(config.train.seed)
    torch.save(build_torchvision_model(torch, config).state_dict(), path)


def child(args) -> None:
    """One side and seed in this process; the result as JSON to args.result."""
    if args.side != "ours":
        # torch before TensorFlow: the other order can crash the process when tfds has just
        # prepared the data set in it.
        import torch  # noqa: F401
    config = load_config(args.config, args.seed, args.steps, args.data_dir)
    init_path = str(pathlib.Path(args.workdir) / f"init_seed{args.seed}.pth")
    if args.side == "init":
        write_init(config, init_path)
        return
    if args.side == "torchvision":
        out = run_torchvision(config, init_path, args.threads)
    else:
        out = run_ours(config, init_path, str(pathlib.Path(args.workdir) / f"ours_{args.seed}"))
    pathlib.Path(args.result).write_text(json.dumps(out))


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for side, color in (("ours", "tab:blue"), ("torchvision", "tab:orange")):
        for row in (r for r in rows if r["side"] == side):
            steps, losses = zip(*row["curve"])
            ax.plot(steps, losses, color=color, alpha=0.6, lw=1,
                    label=side if row["seed"] == rows[0]["seed"] else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (sum of the five terms)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/breadcrumb.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="0: the config's num_steps")
    parser.add_argument("--sides", default="ours,torchvision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/mrcnn_train_parity")
    parser.add_argument("--data_dir", default="/tmp/mrcnn_train_parity/tfds")
    parser.add_argument("--out", default=str(RESULTS / "train_parity.json"))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    # Prepares the data set here, once, before any child imports torch.
    config_steps = int(load_config(args.config, 0, 1, args.data_dir).train.num_steps)
    args.steps = args.steps or config_steps
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for side in ["init", *args.sides.split(",")]:
            result = pathlib.Path(args.workdir) / f"{side}_{seed}.json"
            cmd = [sys.executable, __file__, f"--config={args.config}", f"--side={side}",
                   f"--seed={seed}", f"--steps={args.steps}", f"--threads={args.threads}",
                   f"--workdir={args.workdir}", f"--data_dir={args.data_dir}",
                   f"--result={result}"]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            if side != "init":
                row = {"side": side, "seed": seed, **json.loads(result.read_text())}
                rows.append(row)
                print(f"{side:12s} seed {seed}: bbox AP {row['bbox_AP']:.4f} segm AP "
                      f"{row['segm_AP']:.4f} final loss {row['curve'][-1][1]:.4f} "
                      f"train {row['train_s']:.0f}s", flush=True)
    summary = {}
    for side in args.sides.split(","):
        for kind in ("bbox_AP", "segm_AP"):
            values = [r[kind] for r in rows if r["side"] == side]
            summary[f"{side}/{kind}"] = {"mean": float(np.mean(values)),
                                        "min": float(np.min(values)),
                                        "max": float(np.max(values))}
    out = {"config": args.config, "steps": args.steps, "seeds": args.seeds, "rows": rows,
           "summary": summary}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    plot(rows, pathlib.Path(args.out).with_suffix(".png"))
    print(f"{'side':12s} {'bbox AP mean [min, max]':28s} {'segm AP mean [min, max]':28s}")
    for side in args.sides.split(","):
        b, s = summary[f"{side}/bbox_AP"], summary[f"{side}/segm_AP"]
        print(f"{side:12s} {b['mean']:.4f} [{b['min']:.4f}, {b['max']:.4f}]      "
              f"{s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}]")
    if "ours" in args.sides and "torchvision" in args.sides:
        tv, ours = summary["torchvision/segm_AP"], summary["ours/segm_AP"]
        print(f"train_parity: ours_segm_AP={ours['mean']:.4f} tv_segm_AP={tv['mean']:.4f} "
              f"tv_spread={tv['max'] - tv['min']:.4f} "
              f"ours_bbox_AP={summary['ours/bbox_AP']['mean']:.4f} "
              f"tv_bbox_AP={summary['torchvision/bbox_AP']['mean']:.4f}")


if __name__ == "__main__":
    main()
