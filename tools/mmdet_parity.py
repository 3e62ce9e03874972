#!/usr/bin/env python3
"""Our FCOS, RetinaNet and ATSS against mmdetection's own, on the same weights and input tensor (eager and ONNX Runtime).

mmdet 2.x needs mmcv-full's compiled ops, which do not build for this torch. mmdet's FCOS uses one of
them (NMS) at test time, so this check loads mmcv lite (pure Python) and gives it a Python NMS
(greedy, IoU > threshold suppressed, mmcv's ``+offset`` widths), and torchvision (which mmcv's runner
imports) through ``tools/torchvision_shim.py``. The wheels, fetched without dependencies::

    pip download mmdet==2.17.0 mmdet==2.28.2 addict yapf platformdirs tomli terminaltables --no-deps -d /tmp/mm
    pip download mmcv==1.7.2 --no-deps --no-build-isolation -d /tmp/mm   # an sdist: needs setuptools<70 here
    pip download torchvision==0.28.0 --no-deps -d /tmp/mm
    # unzip the wheels and the mmcv sdist; put mmcv-1.7.2/, one mmdet and the rest on PYTHONPATH

    PYTHONPATH=... python tools/mmdet_parity.py [--gn] [--claim-mmcv 1.4.0]   # --claim-mmcv for mmdet 2.17

mmdet 3.x runs the same way on mmdet 3.3.0 + mmengine + mmcv-lite 2.1.0 (+ termcolor, tqdm, shapely
wheels); its evaluation goes through CocoMetric and is not compared here.

The model is FCOS-R50-caffe (the recipe's architecture; ``--gn`` for the GN=Y head), or with
``--family retinanet`` / ``atss`` mmdet's RetinaNet-R50-FPN / ATSS-R50-FPN 1x (their published model
configs), with ``bench/r50.py``'s calibrated random weights (about 2000 (prior, class) pairs above
0.05 at 800x1333), loaded into mmdet's model with ``strict`` key matching, saved as an mmdet checkpoint
whose meta names the mmdet version (so our loader picks spec §7.2 for < 2.18, §7.3 otherwise),
and run on one real photo letterboxed to 800x1333. mmdet 2.17 ran with mmcv 1.7.2 claiming 1.4.0.
Prints how many of mmdet's 100 detections ours match (same label, box and score), after checking our
preprocessing bit for bit against mmcv's imread/imresize/imnormalize on every sample photo, and our
postprocess's mAP and class-wise AP against mmdet's CocoDataset.evaluate on the same detections.
The last line is the float32 noise floor: mmdet's own model run again with oneDNN off (PyTorch's
other CPU convolution), so an ONNX Runtime error below it is rounding, not a difference in maths.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "val2017"


class _FakeExt(types.ModuleType):
    """``mmcv._ext`` with NMS only; any other op says it is missing when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "nms":
            from torchvision_shim import greedy_nms  # mmcv calls it as nms(bboxes, scores, iou_threshold=, offset=)

            return greedy_nms

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available in this check")

        return missing


def install(claim_mmcv: str | None) -> None:
    """torchvision without its C++ ops, mmcv lite with a Python NMS (and, for old mmdet, an mmcv version it accepts)."""
    sys.path.insert(0, str(REPO / "tools"))
    import torchvision_shim

    torchvision_shim.install()
    sys.modules["mmcv._ext"] = _FakeExt("mmcv._ext")
    if claim_mmcv:
        import mmcv

        mmcv.__version__ = claim_mmcv


def _resnet50(style: str) -> dict:
    """mmdet's ResNet-50 backbone config (BN frozen in eval; the caffe-style FCOS files do not train its affine)."""
    bn = dict(type="BN", requires_grad=style == "pytorch")
    return dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_cfg=bn, norm_eval=True, style=style)


def _fpn(extra: str) -> dict:
    """mmdet's FPN config over C3..C5 with two extra levels (``on_output``: from P5; ``on_input``: from C5)."""
    return dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1, add_extra_convs=extra, num_outs=5)


def model_dict(gn: bool, family: str = "fcos") -> dict:
    """mmdet's FCOS-R50-caffe, RetinaNet-R50 or ATSS-R50 model config (the same keys in mmdet 2.x and 3.x)."""
    if family != "fcos":
        return anchor_model_dict(family)
    return dict(
        type="FCOS",
        backbone=_resnet50("caffe"),
        neck=dict(_fpn("on_output"), relu_before_extra_convs=True),
        bbox_head=dict(
            type="FCOSHead",
            num_classes=80,
            in_channels=256,
            stacked_convs=4,
            feat_channels=256,
            strides=[8, 16, 32, 64, 128],
            norm_cfg=dict(type="GN", num_groups=32, requires_grad=True) if gn else None,
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="IoULoss", loss_weight=1.0),
            loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        ),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100),
    )


def anchor_model_dict(family: str) -> dict:
    """mmdet's RetinaNet-R50-FPN 1x or ATSS-R50-FPN 1x model config (configs/retinanet, configs/atss)."""
    anchors = dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
    stds = [1.0, 1.0, 1.0, 1.0]
    head = dict(type="RetinaHead", loss_bbox=dict(type="L1Loss", loss_weight=1.0))
    if family == "atss":
        anchors = dict(type="AnchorGenerator", octave_base_scale=8, scales_per_octave=1, ratios=[1.0], strides=[8, 16, 32, 64, 128])
        stds = [0.1, 0.1, 0.2, 0.2]
        head = dict(
            type="ATSSHead",
            norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
            loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        )
    return dict(
        type="RetinaNet" if family == "retinanet" else "ATSS",
        backbone=_resnet50("pytorch"),
        neck=_fpn("on_input" if family == "retinanet" else "on_output"),
        bbox_head=dict(
            num_classes=80,
            in_channels=256,
            stacked_convs=4,
            feat_channels=256,
            anchor_generator=anchors,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            **head,
        ),
        test_cfg=dict(
            nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6 if family == "atss" else 0.5), max_per_img=100
        ),
    )


def build_mmdet(gn: bool, family: str = "fcos"):
    """mmdet's own model (2.x: build_detector; 3.x: the MODELS registry) and the meta its checkpoints carry."""
    import mmdet

    if int(mmdet.__version__.split(".")[0]) >= 3:
        import mmengine
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config as Config3
        from mmengine.config import ConfigDict

        register_all_modules()
        text = Config3(dict(model=model_dict(gn, family))).pretty_text
        meta = {"mmdet_version": mmdet.__version__, "mmengine_version": mmengine.__version__, "cfg": text}
        return MODELS.build(ConfigDict(model_dict(gn, family))), meta
    from mmcv import Config
    from mmdet.models import build_detector

    cfg = Config(dict(model=model_dict(gn, family)))
    return build_detector(cfg.model), {"mmdet_version": mmdet.__version__, "config": cfg.pretty_text}


def mmdet_detections(model, x: np.ndarray) -> list:
    """mmdet's test-time detections (score, label, box) for one canvas-sized input, boxes in canvas pixels."""
    xt = torch.from_numpy(x)[None]
    with torch.no_grad():
        if hasattr(model, "simple_test"):  # 2.x
            meta = dict(img_shape=(800, 1333, 3), ori_shape=(800, 1333, 3), pad_shape=(800, 1333, 3), scale_factor=np.ones(4, np.float32), flip=False)
            per_class = model.simple_test(xt, [meta], rescale=False)[0]
            return [(float(r[4]), k, r[:4]) for k, rows in enumerate(per_class) for r in rows]
        outs = model.bbox_head(model.extract_feat(xt))
        meta3 = dict(img_shape=(800, 1333), scale_factor=(1.0, 1.0))
        inst = model.bbox_head.predict_by_feat(*outs, batch_img_metas=[meta3], rescale=False)[0]
        return [(float(s), int(k), b.numpy()) for b, s, k in zip(inst.bboxes, inst.scores, inst.labels)]


def matched(a: list, b: list, box_tol: float, score_tol: float) -> tuple[int, float, float]:
    """Detections of ``a`` with a partner in ``b`` (same label, box and score within the tolerances); worst errors."""
    used: set[int] = set()
    hits, worst_s, worst_b = 0, 0.0, 0.0
    for sa, la, ba in a:
        for j, (sb, lb, bb) in enumerate(b):
            db = float(np.abs(ba - bb).max())
            if j not in used and la == lb and abs(sa - sb) <= score_tol and db <= box_tol:
                used.add(j)
                hits += 1
                worst_s, worst_b = max(worst_s, abs(sa - sb)), max(worst_b, db)
                break
    return hits, worst_s, worst_b


def preprocess_parity() -> None:
    """Real mmcv (imread, imresize, imnormalize) plus the recipe's centred pad vs our preprocess, every sample photo."""
    import math

    import mmcv
    from mmcv.version import __version__ as mmcv_version  # the real one, whatever mmdet was told

    from fcos_offline.data.preprocess import preprocess_image, read_image

    mean, std = np.array([102.9801, 115.9465, 122.7717], np.float32), np.ones(3, np.float32)
    same = 0
    photos = sorted(PHOTOS.glob("*.jpg"))
    for path in photos:
        img = mmcv.imread(str(path))
        h, w = img.shape[:2]
        s = min(1333 / w, 800 / h)
        nw, nh = math.floor(w * s), math.floor(h * s)
        canvas = np.zeros((800, 1333, 3), np.float32)
        top, left = (800 - nh) // 2, (1333 - nw) // 2
        canvas[top : top + nh, left : left + nw] = mmcv.imnormalize(mmcv.imresize(img, (nw, nh)), mean, std, to_rgb=False)
        same += np.array_equal(preprocess_image(read_image(path), 800, 1333)[0], canvas.transpose(2, 0, 1))
    print(f"preprocess: {same}/{len(photos)} photos bit-identical to mmcv {mmcv_version} + the recipe's centred pad")


def evaluation_parity(work: Path) -> None:
    """mmdet's CocoDataset.evaluate (bbox, classwise) vs our postprocess, on jittered ground truth plus
    misplaced boxes for the sample photos (the annotation file widened to COCO's 80 categories, as mmdet needs)."""
    import contextlib
    import io
    import json
    import re

    from mmdet.datasets import CocoDataset

    from fcos_offline.data.annotations import COCO80_CATEGORY_IDS, COCO80_NAMES
    from fcos_offline.data.dumps import write_dumps
    from fcos_offline.data.info import make_info
    from fcos_offline.data.letterbox import boxes_to_canvas, letterbox_for
    from fcos_offline.evaluate.postprocess import postprocess

    data = json.loads(next((PHOTOS.parent / "annotations").glob("*.json")).read_text())
    data["categories"] = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(COCO80_CATEGORY_IDS, COCO80_NAMES)]
    (work / "ann").mkdir(parents=True, exist_ok=True)
    ann_file = work / "ann" / "instances_val2017.json"
    ann_file.write_text(json.dumps(data))
    rng = np.random.default_rng(3)
    for img in data["images"]:
        rows = []
        for a in (a for a in data["annotations"] if a["image_id"] == img["id"] and not a.get("iscrowd")):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            rows.append((COCO80_CATEGORY_IDS.index(a["category_id"]), [x + j[0], y + j[1], x + w + j[2], y + h + j[3]], rng.uniform(0.2, 1.0)))
            if rng.random() < 0.5:
                rows.append((int(rng.integers(80)), [x + w / 2, y + h / 2, x + 1.5 * w, y + 1.5 * h], rng.uniform(0.05, 0.9)))
        rows = sorted(rows, key=lambda r: -r[2])[:100]
        labels, dets = np.full(100, -1, np.int64), np.zeros((100, 5), np.float32)
        if rows:
            labels[: len(rows)] = [r[0] for r in rows]
            boxes = np.clip(np.array([r[1] for r in rows]), 0, [img["width"], img["height"]] * 2)
            dets[: len(rows), :4] = boxes_to_canvas(boxes, letterbox_for(img["width"], img["height"], 800, 1333))
            dets[: len(rows), 4] = [r[2] for r in rows]
        write_dumps(work / "dumps", Path(img["file_name"]).stem, labels, dets)
    make_info("jpg", PHOTOS, work / "jpg.info", workers=1)
    ours = postprocess(work / "dumps", work / "jpg.info", work / "ret", ann_file.parent, 800, 1333)

    ds = CocoDataset(str(ann_file), pipeline=[], test_mode=True, img_prefix=str(PHOTOS))
    per_img = {i["id"]: [np.zeros((0, 5), np.float32) for _ in range(80)] for i in data["images"]}
    for r in json.loads((work / "ret" / "bbox_results.json").read_text()):
        x, y, w, h = r["bbox"]
        k = COCO80_CATEGORY_IDS.index(r["category_id"])
        per_img[r["image_id"]][k] = np.vstack([per_img[r["image_id"]][k], [[x, y, x + w, y + h, r["score"]]]]).astype(np.float32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        theirs = ds.evaluate([per_img[i] for i in ds.img_ids], metric="bbox", classwise=True)
    keys = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
    worst = max(abs(ours[k] - theirs[k]) for k in keys)
    table = dict(re.findall(r"\| ([a-z][a-z ]*?)\s+\| (nan|[0-9.]+)\s+", printed.getvalue()))
    mine = {COCO80_NAMES[COCO80_CATEGORY_IDS.index(r["category_id"])]: r["AP"] for r in ours["classwise"]}
    same = sum(table.get(n) == ("nan" if ap is None or ap != ap else f"{ap:.3f}") for n, ap in mine.items())
    print(
        f"evaluation: mAP {ours['bbox_mAP']:.4f} (ours) vs {theirs['bbox_mAP']:.4f} (mmdet); largest difference over {len(keys)} "
        f"metrics {worst:.1e}; class-wise AP equal for {same}/{len(mine)} classes (mmdet's table, 3 decimals)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gn", action="store_true", help="FCOS: the GN=Y head (GroupNorm in the tower convs)")
    p.add_argument("--family", choices=["fcos", "retinanet", "atss"], default="fcos", help="the detector (default: the recipe's FCOS)")
    p.add_argument("--claim-mmcv", help="mmcv version to report to mmdet (1.4.0 for mmdet 2.17)")
    p.add_argument("--workdir", default="/tmp/mmdet_parity")
    args = p.parse_args()
    install(args.claim_mmcv)
    preprocess_parity()
    import mmdet

    sys.path.insert(0, str(REPO / "bench"))
    from r50 import build_r50, set_candidates

    from fcos_offline.data.preprocess import preprocess_image, read_image
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.export.onnx_export import export_checkpoint
    from fcos_offline.model.checkpoint import load_model, mmdet_state_dict
    from fcos_offline.model.postprocess import DetectorWithPost

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if int(mmdet.__version__.split(".")[0]) < 3 and args.family == "fcos":  # 3.x evaluates through CocoMetric: not compared here
        evaluation_parity(work / "eval")
    photos = sorted(PHOTOS.glob("*.jpg"))
    calib = np.stack([preprocess_image(read_image(p), 800, 1333)[0] for p in photos[:2]])
    source = build_r50(0, calib, head_norm="gn" if args.gn else "none", family=args.family)
    set_candidates(source, calib, 2000.0)
    model, meta = build_mmdet(args.gn, args.family)
    model.load_state_dict(mmdet_state_dict(source), strict=True)
    model.eval()
    ckpt = work / f"{args.family}.pth"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, ckpt)

    x, _ = preprocess_image(read_image(photos[2]), 800, 1333)
    theirs = mmdet_detections(model, x)
    with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's other CPU convolution: the float32 noise floor
        floor = mmdet_detections(model, x)
    with torch.no_grad():
        network, loaded = load_model(ckpt)
        dets, labels = DetectorWithPost(network.eval()).eval()(torch.from_numpy(x)[None])
    keep = labels[0] >= 0
    eager = [(float(d[4]), int(k), d[:4].numpy()) for d, k in zip(dets[0, keep], labels[0, keep])]
    export_checkpoint(ckpt, work / f"{args.family}.onnx", (800, 1333), dynamic_batch=True)
    with open_engine(work / f"{args.family}.onnx", EngineOptions("onnxruntime")) as engine:
        out_d, out_l = engine.run(x[None])
    keep_o = out_l[0] >= 0
    onnx = [(float(d[4]), int(k), d[:4]) for d, k in zip(out_d[0][keep_o], out_l[0][keep_o])]

    name = {"fcos": f"FCOS-R50-caffe {'GN' if args.gn else 'no-GN'} head", "retinanet": "RetinaNet-R50-FPN", "atss": "ATSS-R50-FPN"}[args.family]
    print(f"mmdet {mmdet.__version__}, {name}; ours read it as {loaded.config.head.family}, rule {loaded.config.post.rule}")
    print(f"mmdet: {len(theirs)} detections (scores {max(t[0] for t in theirs):.4f} to {min(t[0] for t in theirs):.4f})")
    rows = (
        ("eager PyTorch", eager, 0.01, 1e-5),
        ("ONNX Runtime", onnx, 0.05, 1e-4),
        ("mmdet itself, oneDNN off (noise floor)", floor, 0.05, 1e-4),
    )
    for name, ours, box_tol, score_tol in rows:
        hits, ds, db = matched(theirs, ours, box_tol, score_tol)
        print(
            f"{name}: {len(ours)} detections, {hits}/{len(theirs)} matched (box <= {box_tol} px, score <= {score_tol}); worst {ds:.2e} / {db:.3f} px"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
