"""Shared fixtures and builders for the test suite.

Builders (plain functions, importable as ``from conftest import ...`` or through the fixtures):

* :func:`fcos_config` — a small FCOS config (narrow widths by default) of any layout.
* :func:`make_fcos` — a random-weight, eval-mode FCOS whose BN statistics and head are
  randomised *and* calibrated so that batch-norm matters and random weights give a useful number
  of well-separated detections (not thousands of ties at sigmoid(0)).
* :func:`randomize_bn` / :func:`calibrate_head` — the two halves of the above.
* :func:`save_mmdet_ckpt` / :func:`save_torchvision_ckpt` — write a model as an mmdet (v1 / v2
  head names, ``{'state_dict','meta'}`` or bare, ``module.`` prefix) or torchvision checkpoint.
* :func:`shared_data_dir` — ``<repo>/../shared/data/coco-val2017-sample`` or a pytest skip.
* :func:`pseudo_labelled_tiny` — a tiny FCOS as ONNX and demo images labelled with its own
  confident detections (fp32 mAP near 1, so int8 error is a real mAP drop): ``tune``'s test data.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fcos_offline.model.match import match_detections

# The test machines have two shared cores: torch's default intra-op pool (2 threads) spins and
# stalls badly when the other core is busy (10x slower here). One thread is the fast, stable
# choice; override with FCOS_TEST_TORCH_THREADS.
try:
    import torch as _torch

    _torch.set_num_threads(int(os.environ.get("FCOS_TEST_TORCH_THREADS", "1")))
except ImportError:  # torch is an optional extra; torch-free tests still run
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

#: a caffe-style ResNet-50-like backbone, but narrow (fast on two CPU cores)
NARROW = dict(stem=8, planes=(8, 16, 32, 64), fpn=32, feat=32)


# --------------------------------------------------------------------------- data


def _find_sample() -> Path | None:
    for shared in (SHARED_DIR, REPO_ROOT / ".." / "shared"):
        folder = shared / "data" / "coco-val2017-sample"
        if (folder / "val2017").is_dir():
            return folder.resolve()
    return None


SAMPLE: Path | None = _find_sample()
"""The 10-photo COCO val2017 sample beside the repository, or None where it is absent."""
needs_sample = pytest.mark.skipif(SAMPLE is None, reason="COCO sample not found at ../shared/data/coco-val2017-sample (shared data absent)")


def shared_data_dir() -> Path:
    """The COCO val2017 sample shipped next to the repository; skip the test if it is absent."""
    path = SHARED_DIR / "data" / "coco-val2017-sample"
    if not (path / "val2017").is_dir():
        pytest.skip(f"shared COCO sample not found at {path}")
    return path


#: the longest modules, started first so that parallel workers (``-n auto --dist loadfile``) end
#: together: the demo tune search alone takes 5-9 minutes on two cores
LONGEST_FIRST = (
    "tune/test_demo.py",
    "engine/test_distributed.py",
    "tune/test_search.py",
    "engine/test_inductor.py",
    "reliability/test_faults.py",
    "report/test_run.py",
    "tune/test_holdout.py",
)
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first (the order inside a module is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def module(item: pytest.Item) -> str:
        path = item.path.resolve()
        return path.relative_to(TESTS_DIR).as_posix() if path.is_relative_to(TESTS_DIR) else str(path)

    items.sort(key=lambda item: rank.get(module(item), len(rank)))


@pytest.fixture
def coco_sample_dir() -> Path:
    """Fixture form of :func:`shared_data_dir`."""
    return shared_data_dir()


def random_canvas(batch: int, height: int, width: int, seed: int = 0):
    """A preprocessed-looking input (BGR minus caffe mean): smooth blobs plus noise, float32 tensor."""
    import torch

    from fcos_offline.export.onnx_export import sample_input

    return torch.from_numpy(sample_input(batch, height, width, seed=seed))


# --------------------------------------------------------------------------- models


def fcos_config(
    *,
    style: str = "caffe",
    block: str = "bottleneck",
    stage_blocks: tuple[int, ...] = (1, 1, 1, 1),
    stem: int = NARROW["stem"],
    planes: tuple[int, ...] = NARROW["planes"],
    fpn: int = NARROW["fpn"],
    feat: int | None = None,
    num_classes: int = 80,
    stacked_convs: int = 2,
    norm: str = "none",
    norm_on_bbox: bool = False,
    centerness_on_reg: bool = False,
    use_scale: bool = True,
    rule: str = "mmdet2",
    bn_impl: str = "mmdet",
    input_adapter: str = "none",
    layout: str = "mmdet",
    family: str = "fcos",
    extra_on: str = "output",
):
    """A small :class:`DetectorConfig`. ``layout='torchvision'`` sets every torchvision-fixed setting;
    ``family`` picks the head (RetinaNet, ATSS: mmdet's published anchor and coder settings)."""
    from fcos_offline.model.checkpoint import ANCHOR_DEFAULTS
    from fcos_offline.model.config import BackboneConfig, DetectorConfig, HeadConfig, NeckConfig, default_post_config

    if layout == "torchvision":
        style, bn_impl, norm, norm_on_bbox, centerness_on_reg, use_scale = (
            "pytorch",
            "torchvision",
            "gn" if family == "fcos" else norm,
            True,
            True,
            False,
        )
        rule, input_adapter = "torchvision", "torchvision"
    if family == "atss":
        use_scale = True
    expansion = 4 if block == "bottleneck" else 1
    outs = tuple(p * expansion for p in planes)
    feat = feat or fpn
    head = HeadConfig(
        num_classes=num_classes,
        in_channels=fpn,
        feat_channels=feat,
        stacked_convs=stacked_convs,
        norm=norm,
        gn_groups=32 if feat % 32 == 0 else feat,
        conv_bias=(norm == "none" or (layout == "torchvision" and family == "fcos")),
        use_scale=use_scale,
        norm_on_bbox=norm_on_bbox,
        centerness_on_reg=centerness_on_reg,
        family=family,  # type: ignore[arg-type]
        **ANCHOR_DEFAULTS.get(family, {}),
    )
    return DetectorConfig(
        backbone=BackboneConfig(
            stage_blocks=tuple(stage_blocks),
            stage_planes=tuple(planes),
            stage_out_channels=outs,
            stem_channels=stem,
            block=block,
            style=style,
            bn_impl=bn_impl,
        ),
        neck=NeckConfig(in_channels=outs[1:], out_channels=fpn, extra_on=extra_on, relu_before_extra=family == "fcos" or layout == "torchvision"),
        head=head,
        post=default_post_config(rule, family),
        input_adapter=input_adapter,
    )


def randomize_bn(model, seed: int = 0, calibrate_with=None) -> None:
    """Give every frozen BN non-trivial statistics and affine parameters.

    With ``calibrate_with`` (an input batch) each BN's running mean/var are set from the actual
    per-channel statistics of its input in that forward pass, then perturbed (mean shifted by up to
    half a std, variance scaled by 0.5–2): BN clearly changes the result, activations stay sane.
    Without it, the statistics are plain random numbers.
    """
    import torch

    from fcos_offline.model.backbone import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)

    def rand(n: int, lo: float, hi: float):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    for bn in bns:
        n = bn.weight.numel()
        bn.weight.copy_(rand(n, 0.5, 1.5))
        bn.bias.copy_(rand(n, -0.3, 0.3))
        bn.running_mean.copy_(rand(n, -0.5, 0.5))
        bn.running_var.copy_(rand(n, 0.5, 2.0))
    if calibrate_with is None:
        return

    def pre_hook(module, inputs):
        x = inputs[0].detach()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3)) + 1e-3
        n = mean.numel()
        module.running_mean.copy_(mean + rand(n, -0.5, 0.5) * var.sqrt())
        module.running_var.copy_(var * rand(n, 0.5, 2.0))

    handles = [bn.register_forward_pre_hook(pre_hook) for bn in bns]
    try:
        with torch.no_grad():
            model(calibrate_with)
    finally:
        for h in handles:
            h.remove()


def calibrate_head(model, x, seed: int = 0, cls_std: float = 2.0, cls_mean: float = -5.0) -> None:
    """Rescale the head's final convs so random weights give spread-out, plausible outputs.

    cls logits ~ N(cls_mean, cls_std) (a few percent of (point, class) pairs above 0.05), centerness
    logits ~ N(0, 1.5), per-level Scale in [0.8, 1.3] and box distances of a few strides.
    """
    import torch

    from fcos_offline.model.heads.spec import head_spec

    head = model.bbox_head
    spec = head_spec(head.cfg.family)
    convs = {kind: getattr(head, name) for kind, name in spec.convs.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    if getattr(head, "scales", None) is not None:
        for s in head.scales:
            s.scale.data.fill_(float(0.8 + 0.5 * torch.rand((), generator=gen)))
    captured: dict[str, list] = {kind: [] for kind in convs}
    hooks = [conv.register_forward_hook(lambda m, i, o, kind=kind: captured[kind].append(o.detach())) for kind, conv in convs.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()

    def stats(name: str):
        flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in captured[name]], dim=1)
        return flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-6)

    def set_affine(conv, name: str, std, mean) -> None:
        m, s = stats(name)
        k = torch.as_tensor(std) / s
        conv.weight.data.mul_(k.reshape(-1, 1, 1, 1))
        conv.bias.data.copy_(mean - m * k)

    with torch.no_grad():
        n_cls = convs["cls"].out_channels
        set_affine(convs["cls"], "cls", cls_std, cls_mean + 0.5 * torch.randn(n_cls, generator=gen))
        if "ctr" in convs:
            set_affine(convs["ctr"], "ctr", 1.5, torch.zeros(convs["ctr"].out_channels))
        n_reg = convs["reg"].out_channels
        if spec.coder == "delta_xywh":  # deltas: centres within about half an anchor, sizes within e^±0.6
            set_affine(convs["reg"], "reg", 0.3 / torch.tensor(head.cfg.target_stds).repeat(n_reg // 4), torch.zeros(n_reg))
        elif head.cfg.norm_on_bbox:
            # distance = ReLU(scale * x) * stride: about 1.5..5 strides
            set_affine(convs["reg"], "reg", 0.5, torch.full((4,), 3.0))
        else:
            # distance = exp(scale * x): mostly 10..100 px
            set_affine(convs["reg"], "reg", 0.35, torch.full((4,), 3.2))


def make_fcos(seed: int = 0, calib_shape: tuple[int, int] = (256, 384), cls_std: float = 2.0, calib_input=None, **config_kw):
    """Random-weight, eval-mode detector built from :func:`fcos_config` keywords (see module doc); ``cls_std``:
    the spread of its class logits (anchor heads, with no centerness to break ties, want less: no saturated scores);
    ``calib_input``: the batch its BN statistics and head are calibrated on (default: random canvases)."""
    import torch

    from fcos_offline.model.detector import Detector

    torch.manual_seed(seed)
    model = Detector(fcos_config(**config_kw)).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 7)
        for name, p in model.named_parameters():
            if ".gn." in name:  # GroupNorm affine: non-trivial too
                p.copy_((0.5 + torch.rand(p.shape, generator=gen)) if name.endswith("weight") else 0.2 * torch.randn(p.shape, generator=gen))
    x = random_canvas(2, *calib_shape, seed=seed + 100) if calib_input is None else calib_input
    randomize_bn(model, seed=seed, calibrate_with=x)
    calibrate_head(model, x, seed=seed, cls_std=cls_std)
    return model


def param_count(model) -> int:
    """Weights and biases, frozen-BN weight/bias buffers included (running stats excluded)."""
    return sum(int(t.numel()) for k, t in model.state_dict().items() if not k.endswith(("running_mean", "running_var")))


# --------------------------------------------------------------------------- checkpoints


def save_mmdet_ckpt(
    model,
    path: Path,
    *,
    head_names: str = "conv",
    num_batches_tracked: bool = True,
    meta: dict[str, Any] | None = None,
    wrap: bool = True,
    prefix: str = "",
    extra: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Save ``model`` as an mmdet checkpoint (v1: ``head_names='fcos'``, v2/v3: ``'conv'``)."""
    import torch

    from fcos_offline.model.checkpoint import mmdet_state_dict

    sd = mmdet_state_dict(model, head_names=head_names, with_num_batches_tracked=num_batches_tracked)
    for k in drop:
        del sd[k]
    sd.update(extra or {})
    sd = {prefix + k: v for k, v in sd.items()}
    obj: Any = {"state_dict": sd, "meta": meta if meta is not None else {"mmdet_version": "1.0rc0+8c5a2e0"}} if wrap else sd
    torch.save(obj, path)
    return Path(path)


def torchvision_state_dict(model, old_fpn_names: bool = False) -> dict[str, Any]:
    """Our FCOS weights renamed to torchvision's ``FCOS`` keys (written independently of the loader)."""
    n_lat = len(model.neck.lateral_convs)
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        fpn_mid = "" if old_fpn_names else "0."
        if key.startswith("backbone."):
            new = "backbone.body." + key[len("backbone.") :]
        elif m := re.fullmatch(r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", key):
            new = f"backbone.fpn.inner_blocks.{m[1]}.{fpn_mid}{m[2]}"
        elif m := re.fullmatch(r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", key):
            i = int(m[1])
            new = f"backbone.fpn.layer_blocks.{i}.{fpn_mid}{m[2]}" if i < n_lat else f"backbone.fpn.extra_blocks.p{6 + i - n_lat}.{m[2]}"
        elif m := re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)", key):
            branch = "classification_head" if m[1] == "cls" else "regression_head"
            idx = 3 * int(m[2]) + (0 if m[3] == "conv" else 1)
            new = f"head.{branch}.conv.{idx}.{m[4]}"
        elif m := re.fullmatch(r"bbox_head\.conv_cls\.(weight|bias)", key):
            new = f"head.classification_head.cls_logits.{m[1]}"
        elif m := re.fullmatch(r"bbox_head\.conv_reg\.(weight|bias)", key):
            new = f"head.regression_head.bbox_reg.{m[1]}"
        elif m := re.fullmatch(r"bbox_head\.conv_centerness\.(weight|bias)", key):
            new = f"head.regression_head.bbox_ctrness.{m[1]}"
        else:
            raise AssertionError(f"no torchvision name for {key}")
        out[new] = value.clone()
    return out


def save_torchvision_ckpt(model, path: Path, *, old_fpn_names: bool = False) -> Path:
    """Save ``model`` (built with ``layout='torchvision'``) as a torchvision ``fcos_resnet50_fpn`` file."""
    import torch

    torch.save(torchvision_state_dict(model, old_fpn_names=old_fpn_names), path)
    return Path(path)


def pseudo_labelled_tiny(root: Path, num_images: int, canvas: tuple[int, int]) -> dict[str, Path]:
    """``root/tiny.onnx`` (dynamic batch, 6 classes) and ``num_images`` demo images whose ground truth is the model's own
    fp32 detections above score 0.5 (``root/pseudo.json``): a random model's mAP on the real labels would be ~0, and every
    drop trivially 0."""
    import json

    import torch

    from fcos_offline.data.info import make_info
    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.infer import items_from_images, run_inference
    from fcos_offline.evaluate.postprocess import postprocess
    from fcos_offline.export.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(make_fcos(seed=0, num_classes=6), root / "tiny.onnx", shape=canvas, dynamic_batch=True)
    make_demo_data(root / "data", "val", num_images, seed=1000)
    images = root / "data" / "val2017"
    engine = open_engine(root / "tiny.onnx", EngineOptions(threads=1))
    run_inference(engine, items_from_images(images), root / "pd", 1, workers=0, show_progress=False)
    make_info("jpg", images, root / "jpg.info", workers=1)
    ann = root / "data" / "annotations" / "instances_val2017.json"
    postprocess(root / "pd", root / "jpg.info", root / "pe", ann, *canvas, class_names=[str(i) for i in range(6)])
    results = json.loads((root / "pe" / "bbox_results.json").read_text())
    data = json.loads(ann.read_text())
    confident = [r for r in results if r["score"] > 0.5]
    data["annotations"] = [
        {
            "id": k + 1,
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "bbox": r["bbox"],
            "area": r["bbox"][2] * r["bbox"][3],
            "iscrowd": 0,
        }
        for k, r in enumerate(confident)
    ]
    assert len(data["annotations"]) >= 5 * num_images
    (root / "pseudo.json").write_text(json.dumps(data))
    return {"root": root, "model": root / "tiny.onnx", "images": images, "ann": root / "pseudo.json"}


# --------------------------------------------------------------------------- shared by several test modules


def assert_padding_contract(dets, labels):
    """Detections first, sorted by score; then all-zero rows with label −1."""
    for d, lab in zip(dets, labels):
        n = int((lab >= 0).sum())
        assert (lab[:n] >= 0).all() and (lab[n:] == -1).all()
        assert (d[n:] == 0).all()
        assert (d[:n, 4] > 0).all()
        assert (np.diff(d[:n, 4]) <= 0).all()
        assert (d[:n, 2] >= d[:n, 0]).all() and (d[:n, 3] >= d[:n, 1]).all()


def sparse_fcos(calib_shape: tuple[int, int] = (256, 384)):
    """Few candidates (most (point, class) pairs far below 0.05): well under 100 detections per image."""
    import torch

    model = make_fcos(num_classes=5, seed=12, calib_shape=calib_shape)
    with torch.no_grad():
        model.bbox_head.conv_cls.bias -= 5.0
    return model


def nms_case():
    """Boxes whose fate shows the IoU convention: no +1, suppress only IoU > 0.5 (strictly)."""
    import torch

    boxes = torch.tensor(
        [
            [
                [0, 0, 10, 10],  # A .9 kept
                [0, 0, 4.9, 10],  # B .8 IoU(A) .49 -> kept (with +1 it would be .536: suppressed)
                [5, 0, 10, 10],  # C .7 IoU(A) exactly .5 -> kept (strict >), disjoint from B
                [0, 0, 10, 5.2],  # D .6 IoU(A) .52 -> suppressed
                [0, 0, 10, 10],  # E .5 same box as A but class 1 -> kept
                [20, 20, 30, 30],
            ]
        ],  # F not a candidate (score −1)
        dtype=torch.float32,
    )
    scores = torch.full((1, 2, 6), -1.0)
    scores[0, 0, :4] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    scores[0, 1, 4] = 0.5
    expected = ([0.9, 0.8, 0.7, 0.5], [0, 0, 0, 1])
    return boxes, scores, expected


# A v2-era config dump (what mmdet puts in meta['config']), GN head with the "tricks".
V2_GN_CONFIG = textwrap.dedent("""\
    model = dict(
        type='FCOS',
        backbone=dict(
            type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
            norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True, style='pytorch'),
        neck=dict(
            type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
            add_extra_convs='on_output', num_outs=5, relu_before_extra_convs=True),
        bbox_head=dict(
            type='FCOSHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,
            strides=[8, 16, 32, 64, 128], norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
            norm_on_bbox=True, centerness_on_reg=True, dcn_on_last_conv=False, center_sampling=True,
            conv_bias=False, loss_bbox=dict(type='GIoULoss', loss_weight=1.0)),
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.4, min_pos_iou=0),
            allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(
            nms_pre=700, min_bbox_size=0, score_thr=0.07, nms=dict(type='nms', iou_threshold=0.45),
            max_per_img=60))
    img_norm_cfg = dict(mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)
    """)


# (height, width): landscape, portrait, tiny, very wide / tall, larger than the canvas, exactly the canvas
SIZES = [(480, 640), (640, 480), (57, 83), (300, 300), (200, 1024), (1024, 200), (256, 384), (720, 1280), (333, 500), (150, 100)]


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Photo-like test images (smooth colour fields plus a few rectangles) of varied sizes, via cv2."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, max(1, w - 8))), int(rng.integers(0, max(1, h - 8)))
            x1, y1 = x0 + int(rng.integers(4, max(5, w // 2))), y0 + int(rng.integers(4, max(5, h // 2)))
            cv2.rectangle(img, (x0, y0), (x1, y1), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        # texture everywhere, as in photos: flat areas give translation-invariant features, hence exactly
        # tied scores at several places, whose order (and so NMS) is up to float rounding in each engine
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        ext = ".png" if i == 3 else ".jpeg" if i == 5 else ".jpg"  # every extension the readers accept
        assert cv2.imwrite(str(folder / f"img{i:02d}{ext}"), img)
    return folder


def dump_bytes(folder: Path) -> dict[str, bytes]:
    """Every dump file of ``folder`` (``*_1.bin``/``*_2.bin`` or ``*.npy``) by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".npy")}


def assert_same_detections(ref: dict, other: dict, what: str) -> None:
    """``other`` reproduces ``ref``: same images, >= 99.9% detections matched at IoU > 0.999."""
    assert sorted(other) == sorted(ref), f"{what}: different images"
    total = matched = 0
    for stem, (labels, dets) in ref.items():
        s = match_detections(dets, labels, other[stem][1], other[stem][0], iou_thr=0.999, score_tol=1e-4)
        assert s.num_ref > 0, f"{stem}: the reference has no detections; the comparison would prove nothing"
        total += max(s.num_ref, s.num_other)
        matched += s.matched
    assert matched / total >= 0.999, f"{what}: {matched}/{total} detections matched"


def torchvision_retinanet_state_dict(model, *, old_layout: bool = False) -> dict:
    """Our RetinaNet's weights under torchvision's ``retinanet_resnet50_fpn`` names (v1 / v2 by its config)."""
    n_lat = len(model.cfg.neck.in_channels)
    out = {}
    for key, value in model.state_dict().items():
        new = key
        if key.startswith("backbone."):
            new = "backbone.body." + key[len("backbone.") :]
        elif key.startswith("neck.lateral_convs."):
            i, _, p = key.split(".")[2:5]
            new = f"backbone.fpn.inner_blocks.{i}.0.{p}"
        elif key.startswith("neck.fpn_convs."):
            i, p = int(key.split(".")[2]), key.split(".")[-1]
            new = f"backbone.fpn.layer_blocks.{i}.0.{p}" if i < n_lat else f"backbone.fpn.extra_blocks.p{i - n_lat + 6}.{p}"
        elif key.startswith("bbox_head.") and "_convs." in key:
            branch, i, part, p = key.split(".")[1:5]
            head = "classification_head" if branch == "cls_convs" else "regression_head"
            new = f"head.{head}.conv.{2 * int(i)}.{p}" if old_layout else f"head.{head}.conv.{i}.{0 if part == 'conv' else 1}.{p}"
        elif key.startswith("bbox_head.retina_cls."):
            new = "head.classification_head.cls_logits." + key.split(".")[-1]
        elif key.startswith("bbox_head.retina_reg."):
            new = "head.regression_head.bbox_reg." + key.split(".")[-1]
        out[new] = value.clone()
    return out
