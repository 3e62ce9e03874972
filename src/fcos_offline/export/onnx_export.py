"""Checkpoint -> ONNX with NMS in the graph (standard ops only), verified against PyTorch.

Contract (the recipe's): input ``input`` float32 ``[B,3,H,W]`` (BGR, caffe mean, centred zero
pad), outputs ``dets`` float32 ``[B,100,5]`` and ``labels`` int64 ``[B,100]``, whatever the head
family. With ``nms=False`` the raw head is exported instead (per level the head's
``HeadSpec.outputs``: ``cls_{l}``, ``reg_{l}`` and, with a score factor, ``ctr_{l}``) plus a
small post-processing graph ``<name>.post.onnx`` that turns those outputs into the same
``dets``/``labels`` with ONNX Runtime — no torch needed offline.

The model's settings travel in the ONNX ``metadata_props`` (``fcos_offline.*`` keys) so later
stages know the canvas, classes and post-processing rule.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcos_offline.data.letterbox import DEFAULT_CANVAS, check_canvas
from fcos_offline.data.preprocess import MEAN_BGR, STD_BGR
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.export.metadata import encode_metadata, post_graph_path
from fcos_offline.model.checkpoint import ModelOverrides, load_model
from fcos_offline.model.detector import Detector
from fcos_offline.model.heads.spec import head_spec
from fcos_offline.model.match import MatchStats, match_batches
from fcos_offline.model.postprocess import DensePostProcess, DetectorWithPost


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well ONNX Runtime reproduced PyTorch."""

    path: str
    post_path: str | None
    shape: tuple[int, int]
    batch: str
    opset: int
    verify: MatchStats | None
    verify_raw: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "path": self.path,
            "post_path": self.post_path,
            "shape": list(self.shape),
            "batch": self.batch,
            "opset": self.opset,
            "verify": self.verify.to_dict() if self.verify else None,
            "verify_raw": self.verify_raw,
        }


def sample_input(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic preprocessed-looking input: smooth blobs around the caffe-mean range."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 60.0, (batch, 3, max(2, height // 32), max(2, width // 32))).astype(np.float32)
    import cv2

    out = np.empty((batch, 3, height, width), np.float32)
    for b in range(batch):
        for c in range(3):
            out[b, c] = cv2.resize(coarse[b, c], (width, height), interpolation=cv2.INTER_CUBIC)
    return out + rng.normal(0.0, 5.0, out.shape).astype(np.float32)


def _attach_metadata(path: Path, meta: dict[str, str], max_per_img: int | None = None) -> None:
    """Store ``meta`` in the file; with ``max_per_img`` also declare dets/labels as [B, max_per_img, …]."""
    import onnx

    model = onnx.load(str(path))
    if max_per_img is not None:
        for out in model.graph.output:
            if out.name in ("dets", "labels"):
                dim = out.type.tensor_type.shape.dim[1]
                dim.ClearField("dim_param")
                dim.dim_value = max_per_img
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _torch_export(module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes or None,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def flatten_raw(raw: tuple[list[torch.Tensor], ...]) -> tuple[torch.Tensor, ...]:
    """Per-output lists of levels -> level-major flat tuple (cls_0, reg_0[, ctr_0], cls_1, …)."""
    return tuple(t for level in zip(*raw) for t in level)


class RawHead(torch.nn.Module):
    """The network with its per-level outputs flattened (``HeadSpec.raw_names``)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return flatten_raw(self.network(images))


class PostOnly(torch.nn.Module):
    """Post-processing alone: flat raw outputs -> (dets, labels) on a fixed canvas."""

    def __init__(self, network: Detector, canvas_hw: tuple[int, int]) -> None:
        super().__init__()
        self.post = DensePostProcess(network.cfg)
        self.kinds = len(head_spec(network.cfg.head.family).outputs)
        self.canvas_hw = canvas_hw

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.post([list(flat[i :: self.kinds]) for i in range(self.kinds)], self.canvas_hw)


def export_onnx(
    network,
    output: str | Path,
    shape: tuple[int, int] = DEFAULT_CANVAS,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    nms: bool = True,
    verify: bool = True,
    class_names: list[str] | None = None,
    source: str | None = None,
) -> ExportResult:
    """Export ``network`` (an eval-mode :class:`~fcos_offline.model.detector.Detector`) and check it with ONNX Runtime."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    check_canvas("export", *shape)
    if opset < 11:
        raise FcosError(f"opset {opset} is too old: NonMaxSuppression/TopK as used need opset >= 11")
    height, width = shape
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(sample_input(batch_size, height, width))
    num_levels = len(network.cfg.head.strides)
    max_per_img = network.cfg.post.max_per_img
    extra = {
        "input_shape": [height, width],
        "batch": "dynamic" if dynamic_batch else batch_size,
        "class_names": class_names,
        "nms_in_graph": nms,
        "source": source,
        "preprocess": {"color": "BGR", "mean": list(MEAN_BGR), "std": list(STD_BGR), "pad": "centred zero"},
    }
    post_path: Path | None = None
    network = network.eval()
    with torch.no_grad():
        if nms:
            module = DetectorWithPost(network).eval()
            names = ["dets", "labels"]
            axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else {}
            _torch_export(module, (example,), output, ["input"], names, axes, opset)
        else:
            names = head_spec(network.cfg.head.family).raw_names(num_levels)
            axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else {}
            _torch_export(RawHead(network), (example,), output, ["input"], names, axes, opset)
            post_path = post_graph_path(output)
            flat = flatten_raw(network(example))
            post_axes = {n: {0: "batch"} for n in [*names, "dets", "labels"]}
            _torch_export(PostOnly(network, (height, width)), flat, post_path, names, ["dets", "labels"], post_axes, opset)
            _attach_metadata(post_path, encode_metadata({"config": network.cfg.to_dict(), **extra}), max_per_img)
    _attach_metadata(output, encode_metadata({"config": network.cfg.to_dict(), **extra}), max_per_img if nms else None)
    raw = verify_raw_head(network, output, example) if verify else None
    stats = verify_export(network, output, post_path, example.numpy()) if verify else None
    result = ExportResult(
        str(output),
        str(post_path) if post_path else None,
        (height, width),
        "dynamic" if dynamic_batch else str(batch_size),
        opset,
        stats,
        raw,
    )
    if stats is not None and stats.match_rate < 0.999:
        raise FcosError(
            f"export verification failed: ONNX Runtime matched {stats.match_rate:.2%} of PyTorch's detections "
            f"(max box error {stats.max_box_err:.3g}px, max score error {stats.max_score_err:.3g})"
        )
    return result


def run_onnx_detector(model_path: str | Path, images: np.ndarray, post_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported model (and its post graph, for ``--no-nms`` exports) in ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: images})
    if post_path is None:
        return outs[0], outs[1]
    post = ort.InferenceSession(str(post_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: o for i, o in zip(post.get_inputs(), outs)}
    dets, labels = post.run(None, feeds)
    return dets, labels


#: the largest relative error (max |ORT - torch| / max |torch|) a raw head output may have after export
RAW_RTOL = 1e-3


def verify_raw_head(network: Detector, model_path: Path, example: torch.Tensor) -> dict[str, Any]:
    """The head's raw maps (its prediction convolutions per level), PyTorch vs ONNX Runtime, compared numerically.

    Detection matching alone passes vacuously when neither side detects anything (e.g. NaN
    weights); this check does not. The exported graph's own head convolutions are read out (one
    run, no second export); non-finite maps are an error naming them.
    """
    import onnx
    import onnxruntime as ort

    levels = len(network.cfg.head.strides)
    spec = head_spec(network.cfg.head.family)
    convs = [spec.convs[kind] for kind in spec.outputs]
    captured: dict[str, list[np.ndarray]] = {name: [] for name in convs}
    hooks = [
        getattr(network.bbox_head, name).register_forward_hook(lambda _m, _i, out, name=name: captured[name].append(out.detach().numpy()))
        for name in convs
    ]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for h in hooks:
            h.remove()
    names = spec.raw_names(levels)
    ref = [captured[name][lvl] for lvl in range(levels) for name in convs]
    bad = [n for n, r in zip(names, ref) if not np.isfinite(r).all()]
    if bad:
        raise FcosError(f"the network's raw outputs hold NaN/inf ({', '.join(bad[:6])}): its weights cannot produce detections")
    model = onnx.load(str(model_path))
    tensors: dict[str, list[str]] = {name: [] for name in convs}
    for node in model.graph.node:
        for name in convs:
            if node.op_type == "Conv" and node.input[1] == f"network.bbox_head.{name}.weight":
                tensors[name].append(node.output[0])
    if any(len(v) != levels for v in tensors.values()):
        raise FcosError(f"{model_path}: the head's convolutions are not where export put them; cannot verify the raw outputs")
    wanted = [tensors[name][lvl] for lvl in range(levels) for name in convs]
    for t in wanted:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(wanted, {session.get_inputs()[0].name: example.numpy()})
    errors = {n: float(np.abs(o - r).max() / (np.abs(r).max() + 1e-6)) for n, o, r in zip(names, outs, ref)}
    worst = max(errors, key=lambda n: errors[n])
    if not np.isfinite(errors[worst]) or errors[worst] > RAW_RTOL:
        raise FcosError(
            f"export verification failed: ONNX Runtime's raw head output {worst} differs from PyTorch's by "
            f"{errors[worst]:.3g} (relative; at most {RAW_RTOL:g} allowed)"
        )
    return {"outputs": len(names), "max_rel_err": errors[worst], "worst_output": worst}


def verify_export(network, model_path: Path, post_path: Path | None, images: np.ndarray) -> MatchStats:
    """PyTorch eager vs ONNX Runtime on ``images``: detection match statistics."""
    with torch.no_grad():
        ref_dets, ref_labels = DetectorWithPost(network).eval()(torch.from_numpy(images))
    dets, labels = run_onnx_detector(model_path, images, post_path)
    return match_batches(ref_dets.numpy(), ref_labels.numpy(), dets, labels)


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    shape: tuple[int, int] = DEFAULT_CANVAS,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    nms: bool = True,
    verify: bool = True,
    overrides: ModelOverrides | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` and export it; returns the export summary (with verification numbers).

    The model is written beside ``output`` under a temporary name and renamed into place only
    after it verified: a failed export never replaces an existing good model.
    """
    import errno
    import os

    from fcos_offline.errors import DiskFullError

    network, ckpt = load_model(checkpoint, overrides)
    out = Path(output)
    tmp = out.with_name(f".{out.stem}.part{os.getpid()}.onnx")
    tmp_post = post_graph_path(tmp)
    try:
        canvas = (int(shape[0]), int(shape[1]))
        result = export_onnx(
            network, tmp, canvas, batch_size, dynamic_batch, opset, nms, verify, class_names=ckpt.class_names, source=str(checkpoint)
        )
        os.replace(tmp, out)
        result.path = str(out)
        if result.post_path:
            post = post_graph_path(out)
            os.replace(tmp_post, post)
            result.post_path = str(post)
    except OSError as exc:  # e.g. a full disk: no half-written model is left behind
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(output, "the partial model was removed") from None
        raise FcosError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_post.unlink(missing_ok=True)
    return result.to_dict()
