"""The accelerator path on an NVIDIA GPU (marker ``gpu``; skipped where torch sees no CUDA device).

What we want on a GPU: the loop-free NMS and the device-side input conversion give exactly the
CPU results; the online baseline (eager fp32) and the compiled fp32 engine reproduce the CPU mAP
on the demo (|Δ| <= 0.001), fp16 and bf16 stay within 0.1 mAP point; the compiled artifact reopens
warm; report.json names the GPU. ``bench/gpu-check.sh`` runs these on a bare GPU machine.
Where there is no GPU, ``run --device cuda`` must say so in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fcos_offline.cli import main  # noqa: E402
from fcos_offline.report.run import RunOptions, run  # noqa: E402

CUDA = torch.cuda.is_available()
_skip = pytest.mark.skipif(not CUDA, reason="no CUDA device here (bench/gpu-check.sh runs these on a GPU machine)")


def needs_gpu(test):
    """Marked ``gpu`` and skipped where torch sees no CUDA device."""
    return pytest.mark.gpu(_skip(test))


def test_run_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys) -> None:
    if CUDA:
        pytest.skip("this machine has a GPU")
    assert main(["run", "--device", "cuda", "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    assert not (tmp_path / "w" / "model").exists()  # refused before exporting anything


@needs_gpu
@pytest.mark.parametrize("seed", range(4))
def test_device_nms_equals_the_cpu_loop(seed: int) -> None:
    from fcos_offline.model.postprocess import greedy_nms, parallel_nms

    gen = torch.Generator().manual_seed(seed)
    n = [300, 1500, 3000, 0][seed]
    xy = torch.rand(2, max(n, 1), 2, generator=gen) * 400
    boxes = torch.cat([xy, xy + torch.rand(2, max(n, 1), 2, generator=gen) * 60 + 1], dim=2)
    scores = (torch.rand(2, 4, max(n, 1), generator=gen) * 8).round() / 8  # ties
    if n == 0:
        scores.zero_()
    expected = greedy_nms(boxes, scores, 0.5, 0.05, 100)
    got = parallel_nms(boxes.cuda(), scores.cuda(), 0.5, 0.05, 100)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


@needs_gpu
def test_device_feed_on_cuda_is_bit_identical() -> None:
    from fcos_offline.data.preprocess import letterbox_uint8, to_input_tensor
    from fcos_offline.engine.torch_runtime import DeviceFeed

    rng = np.random.default_rng(0)
    canvas = (800, 1333)
    feed = DeviceFeed("cuda", canvas)
    for _ in range(3):  # reuses the pinned buffer across batches
        images, pads, expected = [], [], []
        for h, w in [(480, 640), (640, 427), (1200, 300)]:
            resized, lb = letterbox_uint8(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), *canvas)
            images.append(resized)
            pads.append((lb.pad_top, lb.pad_left))
            expected.append(to_input_tensor(resized, lb.pad_top, lb.pad_left, *canvas))
        got = feed.batch(images, pads)
        assert got.device.type == "cuda" and got.cpu().numpy().tobytes() == np.stack(expected).tobytes()


@pytest.fixture(scope="module")
def cpu_map(tmp_path_factory) -> float:
    report = run(RunOptions(engines=("onnxruntime",), batch_sizes=(4,), online=False, workdir=str(tmp_path_factory.mktemp("cpu"))))
    return float(report["entries"][0]["bbox_mAP"])


@needs_gpu
def test_online_and_compiled_fp32_on_cuda_match_the_cpu_map(cpu_map, tmp_path) -> None:
    report = run(RunOptions(device="cuda", engines=("inductor",), batch_sizes=(4,), precision="fp32", workdir=str(tmp_path)))
    assert report["accelerator"]["gpu"] and report["accelerator"]["cuda"]
    by_mode = {e["mode"]: e for e in report["entries"]}
    assert cpu_map > 0.2  # the demo model detects: the comparison is not vacuous
    for mode in ("online", "offline"):
        assert abs(by_mode[mode]["bbox_mAP"] - cpu_map) <= 0.001, (mode, by_mode[mode]["bbox_mAP"], cpu_map)
    assert by_mode["offline"]["engine_info"]["device"] == "cuda" and by_mode["online"]["engine_info"]["device"] == "cuda"


@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_compiled_half_precisions_stay_within_a_tenth_of_a_point(precision, cpu_map, tmp_path) -> None:
    report = run(RunOptions(device="cuda", engines=("inductor",), batch_sizes=(8,), precision=precision, online=False, workdir=str(tmp_path)))
    (entry,) = report["entries"]
    assert entry["engine_info"]["execution_precision"] == precision
    assert abs(entry["bbox_mAP"] - cpu_map) <= 0.001, (precision, entry["bbox_mAP"], cpu_map)


@needs_gpu
def test_compiled_cuda_artifact_reopens_warm(tmp_path: Path) -> None:
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import DEMO_CANVAS
    from fcos_offline.engine.backends import EngineOptions, open_engine

    art = tmp_path / "fcos_gpu"
    argv = ["convert", "--engine", "inductor", "--device", "cuda", "--precision", "fp16", "--batch-size", "8"]
    assert main([*argv, "--checkpoint", str(DEMO_CHECKPOINT), "--shape", *map(str, DEMO_CANVAS), "--output", str(art)]) == 0
    torch._dynamo.reset()  # forget the in-memory compile: what is left is the folder's cache
    with open_engine(art, EngineOptions()) as engine:
        d = engine.describe()
        assert d["device"] == "cuda" and d["execution_precision"] == "fp16" and d["compile_cache_hit"] is True


@pytest.mark.gpu
def test_torchvision_layout_reproduces_torchvision_fcos(tmp_path) -> None:
    """torchvision's own FCOS and our torchvision layout, same random weights, on an image the transform
    leaves unresized (320x500, padded by torchvision to 320x512): the same detections (spec §10).
    Runs where torchvision is installed (the GPU machine; on CPU machines it would pull a CUDA build)."""
    tv_models = pytest.importorskip("torchvision.models.detection", reason="torchvision is not installed here")

    from fcos_offline.data.preprocess import preprocess_image
    from fcos_offline.model.checkpoint import load_model
    from fcos_offline.model.postprocess import DetectorWithPost

    torch.manual_seed(0)
    tv = tv_models.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=320, max_size=500).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-1.5)  # detections above the 0.2 threshold
        for m in tv.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    rng = np.random.default_rng(0)
    bgr = np.clip(rng.random((320, 500, 3)) * 77 + 90, 0, 255).astype(np.uint8)
    with torch.no_grad():
        ref = tv([torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0])[0]
        network, _ = load_model(tmp_path / "tv.pth")
        x, _ = preprocess_image(bgr, 320, 500)
        dets, labels = DetectorWithPost(network.eval()).eval()(torch.from_numpy(x)[None])
    keep = labels[0] >= 0
    assert int(keep.sum()) == len(ref["boxes"]) > 10
    ours, theirs = dets[0, keep][dets[0, keep, 4].argsort(descending=True)], ref["scores"].argsort(descending=True)
    assert torch.equal(labels[0, keep][dets[0, keep, 4].argsort(descending=True)], ref["labels"][theirs])
    torch.testing.assert_close(ours[:, 4], ref["scores"][theirs], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[:, :4], ref["boxes"][theirs], rtol=0, atol=1e-2)


def _frozen_bn(module, eps: float):
    """``module`` with every BatchNorm2d swapped for torchvision's FrozenBatchNorm2d (same statistics, ``eps``)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen_bn(child, eps)
    return module


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torchvision_layout_reproduces_torchvision_retinanet(tmp_path, version: str) -> None:
    """torchvision's own RetinaNet and ours from its state dict, same random weights, on an unresized 320x500 image:
    the same detections. v1 as its COCO weights build it (frozen BN, eps 0, P6 from P5); v2 with BatchNorm2d, a GN
    head and P6 from C5. Runs where torchvision is installed (or through tools/torchvision_shim.py)."""
    tv_models = pytest.importorskip("torchvision.models.detection", reason="torchvision is not installed here")

    from fcos_offline.data.preprocess import preprocess_image
    from fcos_offline.export.onnx_export import export_onnx, run_onnx_detector
    from fcos_offline.model.checkpoint import load_model
    from fcos_offline.model.match import match_detections
    from fcos_offline.model.postprocess import DetectorWithPost

    torch.manual_seed(0)
    build = tv_models.retinanet_resnet50_fpn if version == "v1" else tv_models.retinanet_resnet50_fpn_v2
    tv = build(weights=None, weights_backbone=None, num_classes=91, min_size=320, max_size=500).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-2.5)  # detections above the 0.05 threshold
        for m in tv.backbone.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    if version == "v1":
        _frozen_bn(tv.backbone.body, eps=0.0)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    rng = np.random.default_rng(0)
    bgr = np.clip(rng.random((320, 500, 3)) * 77 + 90, 0, 255).astype(np.uint8)
    with torch.no_grad():
        ref = tv([torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0])[0]
        network, ckpt = load_model(tmp_path / "tv.pth")
        x, _ = preprocess_image(bgr, 320, 500)
        dets, labels = DetectorWithPost(network.eval()).eval()(torch.from_numpy(x)[None])
    assert (ckpt.config.head.family, ckpt.config.post.max_per_img) == ("retinanet", 300)
    keep = labels[0] >= 0
    assert int(keep.sum()) == len(ref["boxes"]) > 50
    theirs = np.concatenate([ref["boxes"].numpy(), ref["scores"].numpy()[:, None]], axis=1)
    stats = match_detections(theirs, ref["labels"].numpy(), dets[0, keep].numpy(), labels[0, keep].numpy(), iou_thr=0.999, score_tol=1e-5)
    assert stats.matched == len(theirs) and stats.max_box_err < 1e-2, stats  # order aside (tied scores), every detection
    export_onnx(network, tmp_path / "tv.onnx", (320, 500), verify=False)
    onnx_dets, onnx_labels = run_onnx_detector(tmp_path / "tv.onnx", x[None])
    keep = onnx_labels[0] >= 0
    stats = match_detections(theirs, ref["labels"].numpy(), onnx_dets[0, keep], onnx_labels[0, keep], iou_thr=0.999, score_tol=1e-4)
    assert stats.matched == len(theirs) and stats.max_box_err < 1e-2, stats  # ONNX Runtime: within 1e-4 score, 0.01 px
