"""``fcos-offline infer`` / ``convert``: engines agree, input modes and batch sizes give the same dumps,
static batches are padded and trimmed, perf file and summary.json, resume, and one-line errors.

One random-weight narrow FCOS (256x384 canvas) is exported once with a dynamic batch; the runs are
made in-process through :func:`fcos_offline.cli.main` (the console script's entry point) and cached
per module, so each configuration runs once however many tests read it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import assert_same_detections, dump_bytes, make_fcos, save_mmdet_ckpt, write_images

from fcos_offline.cli import main
from fcos_offline.data.dumps import dumps_complete, read_dumps
from fcos_offline.data.info import make_info
from fcos_offline.data.perf import parse_perf
from fcos_offline.data.preprocess import preprocess_folder
from fcos_offline.engine.backends import EngineOptions, open_engine
from fcos_offline.engine.infer import STAGES, items_from_images, run_inference
from fcos_offline.errors import UsageError

CANVAS = (256, 384)  # H, W
NUM_IMAGES = 10
COCO_PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-val2017-sample" / "val2017"
LATENCY_KEYS = {"min", "mean", "median", "p90", "p99"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> SimpleNamespace:
    """A random narrow FCOS as an mmdet checkpoint and a dynamic-batch ONNX (NMS in the graph)."""
    from fcos_offline.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("engine_model")
    network = make_fcos(seed=5, calib_shape=CANVAS)
    ckpt = save_mmdet_ckpt(network, root / "fcos_random.pth")
    onnx_path = root / "fcos_random.onnx"
    export_onnx(network, onnx_path, CANVAS, dynamic_batch=True, verify=False)
    return SimpleNamespace(root=root, ckpt=ckpt, onnx=onnx_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("engine_images") / "images")


class Runs:
    """``fcos-offline infer`` runs, each made once per module and looked up by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, tuple[Path, int]] = {}

    def __call__(self, name: str, *args, expect: int = 0) -> Path:
        if name not in self.done:
            out = self.root / name
            code = main(["infer", *map(str, args), "--output", str(out)])
            self.done[name] = (out, code)
        out, code = self.done[name]
        assert code == expect, f"infer run {name!r} exited {code}, expected {expect}"
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("engine_runs"))


@pytest.fixture(scope="module")
def reference(runs: Runs, model, images) -> Path:
    """ONNX Runtime, dynamic model, batch 1, streaming from the image folder (default workers)."""
    return runs("ort_bs1", "--model", model.onnx, "--images", images)


@pytest.fixture(scope="module")
def ort_artifact4(model) -> Path:
    out = model.root / "ort_b4"
    assert main(["convert", "--model", str(model.onnx), "--engine", "onnxruntime", "--batch-size", "4", "--output", str(out)]) == 0
    return out


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def stems(folder: Path) -> list[str]:
    return [p.stem for p in sorted(folder.iterdir()) if p.is_file()]


# --------------------------------------------------------------------------- engines agree


@pytest.mark.parametrize("image_set", ["generated", "coco"])
def test_engines_give_the_same_detections(image_set, runs, model, images, tmp_path_factory) -> None:
    """ORT, OpenVINO f32 and the PyTorch online baseline reproduce each other on the same images."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    if image_set == "coco":
        if not COCO_PHOTOS.is_dir() or len(list(COCO_PHOTOS.glob("*.jpg"))) < NUM_IMAGES:
            pytest.skip(f"real photos not found at {COCO_PHOTOS}")
        folder = COCO_PHOTOS
    else:
        folder = images
    tag = image_set
    ort_dir = runs(f"ort_{tag}", "--model", model.onnx, "--images", folder)
    # different batch sizes on purpose: OpenVINO reshapes the dynamic model to a static 3 and pads 10 = 3+3+3+1
    ov_dir = runs(f"ov_{tag}", "--model", model.onnx, "--engine", "openvino", "--precision", "fp32", "--batch-size", "3", "--images", folder)
    torch_dir = runs(f"torch_{tag}", "--checkpoint", model.ckpt, "--engine", "torch", "--shape", *CANVAS, "--batch-size", "2", "--images", folder)
    ort, ov, pt = read_dumps(ort_dir), read_dumps(ov_dir), read_dumps(torch_dir)
    assert len(pt) == len(list(items_from_images(folder))) >= NUM_IMAGES
    assert_same_detections(pt, ort, f"onnxruntime vs torch ({tag})")
    assert_same_detections(pt, ov, f"openvino vs torch ({tag})")
    assert_same_detections(ort, ov, f"openvino vs onnxruntime ({tag})")
    engines = {d: summary(d)["engine"] for d in (ort_dir, ov_dir, torch_dir)}
    assert [e["engine"] for e in engines.values()] == ["onnxruntime", "openvino", "torch"]
    assert engines[ov_dir]["execution_precision"] == "fp32" and engines[ov_dir]["static_batch"] == 3
    # each records the model's labels, which postprocess maps to categories with (the random model: COCO's 80)
    assert {e["num_classes"] for e in engines.values()} == {80}


# --------------------------------------------------------------------------- input modes


def test_bin_mode_jpg_mode_and_streaming_dumps_are_identical(reference, runs, model, images, tmp_path) -> None:
    """Recipe flow (preprocess -> bin .info -> infer), jpg-mode .info and --images give the same bytes."""
    listing_before = sorted(p.name for p in images.iterdir())
    bins = tmp_path / "bins"
    pre = preprocess_folder(images, bins, *CANVAS, workers=1)
    assert pre.written == NUM_IMAGES and not pre.bad
    bin_info = make_info("bin", bins, tmp_path / "fcos.info", width=CANVAS[1], height=CANVAS[0], workers=1)
    jpg_info = make_info("jpg", images, tmp_path / "fcos_jpeg.info", workers=1)
    assert len(bin_info.entries) == len(jpg_info.entries) == NUM_IMAGES
    bin_out = runs("ort_bin_info", "--model", model.onnx, "--input-info", bin_info.out_path)
    jpg_out = runs("ort_jpg_info", "--model", model.onnx, "--input-info", jpg_info.out_path)

    ref = dump_bytes(reference)
    assert len(ref) == 2 * NUM_IMAGES
    assert dump_bytes(bin_out) == ref
    assert dump_bytes(jpg_out) == ref
    # every dump has the documented size and dtype
    for stem in (p.stem for p in sorted(images.iterdir())):
        labels = np.fromfile(reference / f"{stem}_1.bin", dtype="<i8")
        dets = np.fromfile(reference / f"{stem}_2.bin", dtype="<f4").reshape(100, 5)
        assert labels.shape == (100,) and (labels >= 0).sum() > 0
        valid = labels >= 0
        assert np.all(dets[valid, 4] > 0) and np.all(dets[~valid] == 0) and np.all(labels[~valid] == -1)
        assert np.all(dets[valid, 2] <= CANVAS[1]) and np.all(dets[valid, 3] <= CANVAS[0])
    # streaming wrote no intermediate tensor anywhere: only dumps, summary, perf file and the dumps' key, images untouched
    assert sorted(p.name for p in images.iterdir()) == listing_before
    for out in (reference, jpg_out):
        extra = {p.name for p in out.iterdir()} - set(ref)
        assert extra == {"summary.json", "perf_vision_batchsize_1_device_0.txt", ".fcos-dumps.json"}, extra
    # the bin flow measured no preprocessing, the streaming flows did, per image
    assert summary(bin_out)["latency_ms"]["preprocess"]["count"] == 0
    assert summary(reference)["latency_ms"]["preprocess"]["count"] == NUM_IMAGES
    assert summary(jpg_out)["latency_ms"]["preprocess"]["count"] == NUM_IMAGES


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("batch", [3, 4])
def test_batch_sizes_give_identical_dumps(batch, reference, runs, model, images) -> None:
    """Dynamic-batch ONNX: batch 3 and 4 over 10 images (partial last batch) equal batch 1 byte for byte."""
    out = runs(f"ort_bs{batch}", "--model", model.onnx, "--images", images, "--batch-size", batch)
    assert dump_bytes(out) == dump_bytes(reference)
    s = summary(out)
    assert s["batch_size"] == batch and s["num_inferred"] == NUM_IMAGES and s["num_images"] == NUM_IMAGES
    assert s["latency_ms"]["infer"]["count"] == math.ceil(NUM_IMAGES / batch)  # one engine call per batch
    assert (out / f"perf_vision_batchsize_{batch}_device_0.txt").is_file()


def test_static_batch_artifact_pads_and_trims(reference, runs, model, images, ort_artifact4, tmp_path) -> None:
    """A batch-4 ``convert`` artifact (ORT and OpenVINO) runs 10 images: padding dropped, none lost or doubled."""
    art = json.loads((ort_artifact4 / "artifact.json").read_text())
    assert art["batch_size"] == 4 and art["input_shape"] == [4, 3, *CANVAS]
    # bs 4 -> 4+4+2(+2 pad); bs 3 -> every call 3(+1 pad) and 1(+3 pad); bs 8 -> two calls per batch
    outs = {b: runs(f"ort_art4_bs{b}", "--model", ort_artifact4, "--images", images, "--batch-size", b, "--workers", 0) for b in (4, 3, 8)}
    for b, out in outs.items():
        s = summary(out)
        assert s["engine"]["static_batch"] == 4 and s["num_inferred"] == NUM_IMAGES
        assert set(read_dumps(out)) == set(stems(images)) and len(dump_bytes(out)) == 2 * NUM_IMAGES, f"bs {b}"
    # identical bytes whatever the padding layout: each image's result depends only on that image
    assert dump_bytes(outs[3]) == dump_bytes(outs[4]) == dump_bytes(outs[8])
    # and it is that image's result (no shift between images): same detections as the dynamic model
    assert_same_detections(read_dumps(reference), read_dumps(outs[4]), "ORT batch-4 artifact vs dynamic ONNX")

    # the engine call itself: a partial batch comes back with exactly its own rows
    engine = open_engine(ort_artifact4, EngineOptions("onnxruntime", batch_size=4))
    ref = read_dumps(reference)
    names = sorted(ref)
    tensors = np.stack([np.fromfile(p, dtype="<f4").reshape(3, *CANVAS) for p in _bins_of(images, names, tmp_path)])
    for n in (1, 2, 5):  # 5 > static batch: two padded calls
        dets, labels = engine.run(tensors[:n])
        assert dets.shape == (n, 100, 5) and labels.shape == (n, 100) and labels.dtype == np.int64
        for i in range(n):
            np.testing.assert_array_equal(labels[i], read_dumps(outs[4])[names[i]][0])
            np.testing.assert_array_equal(dets[i], read_dumps(outs[4])[names[i]][1])

    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    ov_art = tmp_path / "ov_b4"
    assert main(["convert", "--model", str(model.onnx), "--engine", "openvino", "--batch-size", "4", "--output", str(ov_art)]) == 0
    ov_dyn = runs("ov_dyn_bs1", "--model", model.onnx, "--engine", "openvino", "--images", images, "--workers", 0)
    ov_static = runs("ov_art4_bs4", "--model", ov_art, "--engine", "openvino", "--images", images, "--batch-size", 4, "--workers", 0)
    assert summary(ov_static)["engine"]["static_batch"] == 4
    assert dump_bytes(ov_static) == dump_bytes(ov_dyn)


def test_a_feed_that_does_not_fit_a_fixed_batch_is_said(model, images, ort_artifact4, tmp_path, capsys) -> None:
    """--batch-size 3 on a batch-4 model runs (padded), and says so: its fps are not the model's at batch 3."""
    capsys.readouterr()
    assert main(["infer", "--model", str(ort_artifact4), "--images", str(images), "--batch-size", "3", "--output", str(tmp_path / "b3")]) == 0
    err = capsys.readouterr().err
    assert "has a fixed batch of 4: each batch of 3 runs as 1 call(s) of 4, 1 of its 4 rows zeros" in err
    assert main(["infer", "--model", str(ort_artifact4), "--images", str(images), "--output", str(tmp_path / "b4")]) == 0
    assert "fixed batch" not in capsys.readouterr().err  # its own batch: nothing to say
    # a fixed-batch ONNX file (no artifact) runs at its own batch too, and --batch-size 4 on 3 images is not cut to 3
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(images.iterdir())[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    for extra, out in (([], "raw"), (["--batch-size", "4"], "asked")):
        args = ["infer", "--model", str(ort_artifact4 / "model.onnx"), "--images", str(few), "--output", str(tmp_path / out), *extra]
        assert main(args) == 0
        assert "fixed batch" not in capsys.readouterr().err
        assert summary(tmp_path / out)["batch_size"] == 4


def _bins_of(images: Path, names: list[str], tmp_path: Path) -> list[Path]:
    bins = tmp_path / "engine_bins"
    preprocess_folder(images, bins, *CANVAS, workers=1)
    return [bins / f"{n}.bin" for n in names]


def test_npy_output_format(reference, runs, model, images) -> None:
    out = runs("ort_npy", "--model", model.onnx, "--images", images, "--output-format", "npy", "--batch-size", 4)
    files = sorted(p.name for p in out.glob("*.npy"))
    assert files == sorted(f"{s}_{r}.npy" for s in stems(images) for r in ("labels", "dets"))
    assert not list(out.glob("*.bin"))
    ref = read_dumps(reference)
    for stem, (labels, dets) in ref.items():
        lab = np.load(out / f"{stem}_labels.npy")
        det = np.load(out / f"{stem}_dets.npy")
        assert lab.dtype == np.int64 and lab.shape == (100,) and det.dtype == np.float32 and det.shape == (100, 5)
        np.testing.assert_array_equal(lab, labels)
        np.testing.assert_array_equal(det, dets)
        assert dumps_complete(out, stem, "npy")
    assert set(read_dumps(out)) == set(ref)


# --------------------------------------------------------------------------- perf file and summary.json


def test_summary_and_perf_file_round_trip(reference, runs, model, images, tmp_path, capsys) -> None:
    s = summary(reference)
    for key in (
        "engine",
        "num_images",
        "num_inferred",
        "num_resumed",
        "batch_size",
        "wall_s",
        "throughput_fps",
        "infer_fps",
        "latency_ms",
        "skipped",
        "perf_file",
        "warmup",
        "loop",
    ):
        assert key in s, key
    assert s["num_images"] == s["num_inferred"] == NUM_IMAGES and s["num_resumed"] == 0 and s["skipped"] == []
    assert s["throughput_fps"] == pytest.approx(NUM_IMAGES / s["wall_s"])
    assert s["infer_fps"] >= s["throughput_fps"] > 0
    assert s["engine_spread_pct"] is not None and s["engine_spread_pct"] >= 0  # 10 batches: three segments
    assert set(s["latency_ms"]) == set(STAGES) == {"read", "preprocess", "infer", "postprocess", "e2e"}
    counts = {"read": NUM_IMAGES, "preprocess": NUM_IMAGES, "infer": NUM_IMAGES, "postprocess": NUM_IMAGES, "e2e": NUM_IMAGES}
    for stage, lat in s["latency_ms"].items():
        assert LATENCY_KEYS <= set(lat), stage
        assert lat["count"] == counts[stage], stage
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"], (stage, lat)
        assert lat["min"] <= lat["mean"], (stage, lat)
    # e2e latency of an image includes its reading and inference
    assert s["latency_ms"]["e2e"]["median"] >= s["latency_ms"]["infer"]["min"]

    perf = Path(s["perf_file"])
    assert perf == reference / "perf_vision_batchsize_1_device_0.txt"
    parsed = parse_perf(perf)
    st, lat, tol = parsed["stages"], s["latency_ms"], 1e-3  # the file keeps 3 decimals
    assert parsed["batch_size"] == 1
    assert parsed["e2e_fps"] == pytest.approx(s["throughput_fps"], abs=tol)
    assert st["e2e"]["latency"] == pytest.approx(s["wall_s"] * 1000, abs=tol)
    assert parsed["interface_fps"] == pytest.approx(s["infer_fps"], abs=tol)
    assert st["infer"]["moduleLatency"] == pytest.approx(lat["infer"]["mean"], abs=tol)
    assert st["data read"]["moduleLatency"] == pytest.approx(lat["read"]["mean"], abs=tol)
    assert st["preprocess"]["moduleLatency"] == pytest.approx(lat["preprocess"]["mean"], abs=tol)
    assert st["post"]["moduleLatency"] == pytest.approx(lat["postprocess"]["mean"], abs=tol)
    assert parsed["recipe_fps"] == pytest.approx(4 * parsed["interface_fps"])

    capsys.readouterr()
    assert main(["parse", str(perf)]) == 0
    out = capsys.readouterr().out
    assert f"310 bs1 fps:{parsed['recipe_fps']:.3f}" in out
    assert f"{parsed['interface_fps']:.3f} img/s in the model" in out and f"{parsed['e2e_fps']:.3f} img/s end to end" in out
    assert main(["parse", str(reference / "summary.json")]) == 0
    assert f"{s['throughput_fps']:.3f} img/s (files in -> dumps out)" in capsys.readouterr().out

    # batch 4 over 10 images: per-image infer latency is the per-batch mean over 4
    s4 = summary(runs("ort_bs4", "--model", model.onnx, "--images", images, "--batch-size", 4))
    p4 = parse_perf(s4["perf_file"])
    assert p4["batch_size"] == 4
    assert p4["stages"]["infer"]["moduleLatency"] == pytest.approx(s4["latency_ms"]["infer"]["mean"] / 4, abs=tol)

    # recipe layout: dumps in result/dumpOutput_device1 -> perf file in result/, named by --device-id
    result = tmp_path / "result"
    assert (
        main(
            [
                "infer",
                "--model",
                str(model.onnx),
                "--images",
                str(images),
                "--workers",
                "0",
                "--output",
                str(result / "dumpOutput_device1"),
                "--device-id",
                "1",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert (result / "perf_vision_batchsize_2_device_1.txt").is_file()
    assert not list((result / "dumpOutput_device1").glob("perf_*"))
    assert parse_perf(result / "perf_vision_batchsize_2_device_1.txt")["batch_size"] == 2


def test_warmup_and_loop_call_the_engine_as_asked(model, images, reference, tmp_path) -> None:
    """--warmup W --loop L: W untimed calls of the first batch, L timed calls of every batch, same dumps."""
    engine = open_engine(model.onnx, EngineOptions("onnxruntime", batch_size=4))
    calls: list[int] = []
    real_run = engine.run

    def counting_run(batch):
        calls.append(batch.shape[0])
        return real_run(batch)

    engine.run = counting_run
    s = run_inference(engine, items_from_images(images), tmp_path / "out", batch_size=4, warmup=2, loop=3, workers=0, show_progress=False)
    assert calls == [4, 4] + [4] * 3 + [4] * 3 + [2] * 3
    assert s.warmup == 2 and s.loop == 3 and s.latency_ms["infer"]["count"] == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["loop"] == 3
    assert dump_bytes(tmp_path / "out") == dump_bytes(reference)


# --------------------------------------------------------------------------- resume


def test_resume_redoes_only_missing_or_torn_dumps(reference, model, images, tmp_path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    ref = dump_bytes(reference)
    names = sorted(stems(images))
    for name, data in ref.items():
        (out / name).write_bytes(data)
    (out / ".fcos-dumps.json").write_bytes((reference / ".fcos-dumps.json").read_bytes())  # the same model's run was interrupted
    (out / f"{names[0]}_2.bin").unlink()  # labels written, dets not: killed between the two files
    (out / f"{names[1]}_1.bin").write_bytes(ref[f"{names[1]}_1.bin"][:300])  # torn by a non-atomic writer
    (out / f"{names[2]}_1.bin").unlink()
    (out / f"{names[2]}_2.bin").unlink()
    (out / f"{names[3]}_2.bin.part4242").write_bytes(b"\0" * 1000)  # temporary file of a killed writer
    sentinel = out / f"{names[4]}_2.bin"
    mtime = sentinel.stat().st_mtime_ns
    code = main(["infer", "--model", str(model.onnx), "--images", str(images), "--output", str(out), "--resume", "--workers", "0"])
    assert code == 0
    s = summary(out)
    assert s["num_resumed"] == NUM_IMAGES - 3 and s["num_inferred"] == 3 and s["num_images"] == NUM_IMAGES
    assert dump_bytes(out) == ref
    assert sentinel.stat().st_mtime_ns == mtime  # complete dumps were not rewritten
    assert set(read_dumps(out)) == set(names)  # the stray temporary file is not a dump


def test_a_dump_folder_never_mixes_models(model, images, tmp_path, capsys) -> None:
    """A fresh run replaces an earlier run's dumps of another model (and says so), --resume on them
    is refused, and dumps this tool did not stamp are neither mixed in nor removed."""
    out = tmp_path / "out"
    two = tmp_path / "two"
    two.mkdir()
    for p in sorted(images.iterdir())[:2]:
        (two / p.name).write_bytes(p.read_bytes())
    base = ["infer", "--model", str(model.onnx), "--output", str(out), "--workers", "0"]
    assert main([*base, "--images", str(images), "--batch-size", "2"]) == 0
    assert len(read_dumps(out)) == NUM_IMAGES
    earlier_perf = Path(summary(out)["perf_file"])
    assert earlier_perf.name == "perf_vision_batchsize_2_device_0.txt" and earlier_perf.is_file()
    (out / "mine.bin").write_bytes(b"a user's file, not a dump")
    capsys.readouterr()
    assert main([*base, "--images", str(two), "--engine", "openvino", "--precision", "fp32"]) == 0
    assert f"removed the {2 * NUM_IMAGES} dump files (and summary, perf file) of an earlier run" in capsys.readouterr().err
    assert (out / "mine.bin").is_file() and summary(out)["num_images"] == 2  # other files stay; the summary is this run's
    assert not earlier_perf.exists() and Path(summary(out)["perf_file"]).is_file()  # parse reads only this run's perf file
    (out / "mine.bin").unlink()
    assert set(read_dumps(out)) == set(stems(two))  # only this run's images: postprocess cannot score a mixture
    assert main([*base, "--images", str(images), "--resume"]) == 1
    assert "another model" in _one_line_error(capsys)
    assert set(read_dumps(out)) == set(stems(two))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x_1.bin").write_bytes(np.zeros(100, np.int64).tobytes())
    assert main(["infer", "--model", str(model.onnx), "--images", str(two), "--output", str(foreign)]) == 1
    assert "another tool or an unknown run" in _one_line_error(capsys) and (foreign / "x_1.bin").is_file()


# --------------------------------------------------------------------------- errors


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_engine_usage_errors_are_one_line(model, images, tmp_path, capsys) -> None:
    base = ["infer", "--images", str(images), "--output", str(tmp_path / "o")]
    # unknown engine: argparse refuses it (exit 2) naming the valid choices
    capsys.readouterr()
    assert main([*base, "--model", str(model.onnx), "--engine", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid choice: 'tensorrt'" in err and "onnxruntime" in err
    with pytest.raises(UsageError, match="unknown engine 'tensorrt'"):
        open_engine(model.onnx, EngineOptions("tensorrt"))

    assert main([*base, "--model", str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx: no such model file" in _one_line_error(capsys)

    assert main([*base, "--engine", "torch", "--model", str(model.onnx), "--shape", *map(str, CANVAS)]) == 2
    assert "--checkpoint" in _one_line_error(capsys)
    assert main([*base, "--engine", "torch", "--checkpoint", str(model.ckpt)]) == 2
    assert "--shape" in _one_line_error(capsys)
    assert main([*base, "--checkpoint", str(model.ckpt), "--engine", "onnxruntime"]) == 2  # a checkpoint with an exported-model engine
    assert "--engine torch" in _one_line_error(capsys)
    assert main([*base, "--checkpoint", str(model.ckpt)]) == 2  # a checkpoint alone runs the online baseline: it needs the canvas
    assert "--shape" in _one_line_error(capsys)
    assert main([*base, "--model", str(model.ckpt), "--engine", "openvino"]) == 2
    assert "export" in _one_line_error(capsys)
    for engine in ("onnxruntime", "openvino"):
        assert main([*base, "--model", str(model.onnx), "--engine", engine, "--batch-size", "0"]) == 2
        assert "--batch-size" in _one_line_error(capsys)
    assert main([*base, "--model", str(model.onnx), "--loop", "0"]) == 2
    assert "--loop" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists() or not dump_bytes(tmp_path / "o")
    not_onnx = tmp_path / "garbage.onnx"
    not_onnx.write_bytes(b"not a model")
    assert main([*base, "--model", str(not_onnx)]) == 1
    assert "not a readable ONNX file" in _one_line_error(capsys)


@pytest.mark.parametrize("device,extra", [("cuda", "gpu"), ("tensorrt", "gpu"), ("cann", "cann")])
def test_missing_execution_provider_is_a_one_line_hint(device, extra, model, images, tmp_path, capsys) -> None:
    """ONNX Runtime's CUDA / TensorRT / CANN providers: where the package that has them is absent, one line names it."""
    import onnxruntime as ort

    provider = {"cuda": "CUDA", "tensorrt": "Tensorrt", "cann": "CANN"}[device] + "ExecutionProvider"
    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    code = main(["infer", "--model", str(model.onnx), "--images", str(images), "--output", str(tmp_path / "o"), "--device", device])
    assert code == 1
    line = _one_line_error(capsys)
    assert provider in line and f"fcos-offline[{extra}]" in line


def test_console_script_exit_code_without_traceback(tmp_path) -> None:
    """The installed entry point, as a user runs it: one line on stderr, exit 1."""
    exe = Path(sys.executable).with_name("fcos-offline")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "fcos_offline.cli"]
    proc = subprocess.run(
        [*cmd, "infer", "--model", str(tmp_path / "nope.onnx"), "--images", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such model file" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_bin_in_info_is_skipped_with_exit_3(reference, model, images, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    preprocess_folder(images, bins, *CANVAS, workers=1)
    info = make_info("bin", bins, tmp_path / "ok.info", width=CANVAS[1], height=CANVAS[0], workers=1)
    bad = tmp_path / "bad" / "short.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"\0" * 1000)
    lines = [f"{e.index} {e.path} {e.width} {e.height}" for e in info.entries]
    lines.insert(3, f"3 {bad} {CANVAS[1]} {CANVAS[0]}")
    lines.append(f"11 {tmp_path / 'gone.bin'} {CANVAS[1]} {CANVAS[0]}")
    mixed = tmp_path / "mixed.info"
    mixed.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["infer", "--model", str(model.onnx), "--input-info", str(mixed), "--output", str(out), "--batch-size", "4"])
    assert code == 3
    err = capsys.readouterr().err
    assert "short.bin" in err and "gone.bin" in err and "Traceback" not in err
    s = summary(out)
    assert [Path(k["path"]).name for k in s["skipped"]] == ["short.bin", "gone.bin"]
    assert "1000 bytes" in s["skipped"][0]["problem"]
    assert s["num_inferred"] == NUM_IMAGES and s["num_images"] == NUM_IMAGES + 2
    assert dump_bytes(out) == dump_bytes(reference)


def test_bins_listed_at_another_size_are_refused_not_reshaped(model, images, tmp_path, capsys) -> None:
    """A bin-mode .info lists each tensor's width and height: a listing that contradicts the model's
    canvas (here H and W swapped, same byte count) names the file instead of feeding a scrambled
    tensor; when every input is unusable the run fails (exit 1), it does not 'complete with skips'."""
    bins = tmp_path / "bins"
    preprocess_folder(images, bins, *CANVAS, workers=1)
    swapped = tmp_path / "swapped.info"
    make_info("bin", bins, swapped, width=CANVAS[0], height=CANVAS[1], workers=1)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["infer", "--model", str(model.onnx), "--input-info", str(swapped), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"listed as {CANVAS[0]}x{CANVAS[1]}" in err and f"takes {CANVAS[1]}x{CANVAS[0]}" in err
    assert "no usable inputs" in err and "Traceback" not in err and not list(out.glob("*.bin"))


def test_model_settings_are_refused_for_an_exported_model(model, images, tmp_path, capsys) -> None:
    """--score-thr, --rule ... and --shape only mean something for a checkpoint: an exported model has
    them built in, so giving them is a usage error, not a silent no-op."""
    base = ["infer", "--model", str(model.onnx), "--images", str(images), "--output", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*base, "--score-thr", "0.9", "--max-per-img", "5"]) == 2
    line = _one_line_error(capsys)
    assert "--score-thr --max-per-img" in line and "built in" in line
    assert main([*base, "--shape", "640", "640"]) == 2
    assert f"takes {CANVAS[0]}x{CANVAS[1]}" in _one_line_error(capsys)
    assert main(["convert", "--model", str(model.onnx), "--rule", "torchvision", "--output", str(tmp_path / "c")]) == 2
    assert "--rule" in _one_line_error(capsys) and not (tmp_path / "c").exists()
    assert main([*base, "--shape", *map(str, CANVAS)]) == 0  # the model's own canvas is fine


def test_the_recipe_benchmark_flags_are_accepted_and_checked(model, images, tmp_path, capsys) -> None:
    """The benchmark tool's flags work beside ours; its input size is checked against the model's canvas."""
    h, w = CANVAS
    base = ["infer", "--om_path", str(model.onnx), "--images", str(images), "--output", str(tmp_path / "o"), "--model_type=vision"]
    base += ["--output_binary=True", "--useDvpp=False", f"--input_height={h}"]
    assert main([*base, f"--input_width={w}"]) == 0
    capsys.readouterr()
    assert main([*base, f"--input_width={w + 32}"]) == 2
    line = _one_line_error(capsys)
    assert f"takes {h}x{w}" in line and f"not the {h}x{w + 32} asked" in line and "--input_height/--input_width" in line
    assert main(["infer", "--model", str(model.onnx), "--images", str(images), "--input-info", "x.info"]) == 2  # one input, not two
    assert "exactly one input" in _one_line_error(capsys)


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """`fcos-offline inspect X --json | head -c 1`: the reader left, so no error line and no traceback, exit 141."""
    from fcos_offline.demo import DEMO_CHECKPOINT

    code = "import sys; from fcos_offline.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as in a user's shell
    for table in ([], ["--json"]):  # rich's table and our own print
        cmd = [sys.executable, "-c", code, "inspect", str(DEMO_CHECKPOINT), *table]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141 and err == "", (table, err)


def test_an_output_through_a_link_is_written_through_it(images, tmp_path) -> None:
    """get-info to a symlink (or /dev/stdout redirected to a file) writes through the link and keeps it;
    its status line then goes to stderr, so the list on stdout stays a clean .info."""
    from fcos_offline.data.info import read_info

    real, link = tmp_path / "real.info", tmp_path / "link.info"
    link.symlink_to(real)
    assert main(["get-info", "jpg", str(images), str(link), "--workers", "1"]) == 0
    assert link.is_symlink() and len(read_info(real)) == NUM_IMAGES
    code = "import sys; from fcos_offline.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(tmp_path / "redirected.info", "wb") as f:
        done = subprocess.run([sys.executable, "-c", code, "get-info", "jpg", str(images), "/proc/self/fd/1"], stdout=f, stderr=subprocess.PIPE)
    assert done.returncode == 0 and "wrote" in done.stderr.decode()
    assert len(read_info(tmp_path / "redirected.info")) == NUM_IMAGES


def test_convert_refuses_to_change_a_fixed_batch(ort_artifact4, tmp_path, capsys) -> None:
    fixed = ort_artifact4 / "model.onnx"  # batch fixed to 4
    capsys.readouterr()
    assert main(["convert", "--model", str(fixed), "--batch-size", "2", "--output", str(tmp_path / "b2")]) == 2
    line = _one_line_error(capsys)
    assert "fixed batch of 4" in line and "--dynamic-export" in line
    assert not (tmp_path / "b2").exists()  # refused before anything is written
    assert main(["convert", "--model", str(fixed), "--batch-size", "0", "--output", str(tmp_path / "b0")]) == 2
    assert "--batch-size" in _one_line_error(capsys)
    # an artifact is only usable with its own engine
    assert main(["infer", "--model", str(ort_artifact4), "--engine", "openvino", "--images", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--engine onnxruntime" in _one_line_error(capsys)


def test_infer_is_one_library_call(reference, ort_artifact4, images, tmp_path) -> None:
    """What the verb does, from Python: the request's inputs, the artifact's batch, the same dumps."""
    from fcos_offline.engine.job import InferRequest, infer

    s = infer(InferRequest(model=str(ort_artifact4), images=str(images), output=tmp_path / "out", workers=0))
    assert s.batch_size == 4 and s.num_inferred == NUM_IMAGES and summary(tmp_path / "out")["num_inferred"] == NUM_IMAGES
    assert_same_detections(read_dumps(reference), read_dumps(tmp_path / "out"), "library infer()")


def test_a_fixed_batch_artifact_runs_at_its_batch(reference, ort_artifact4, images, tmp_path) -> None:
    """Without --batch-size, infer takes the artifact's batch (flag > artifact > default), not 1."""
    out = tmp_path / "out"
    assert main(["infer", "--model", str(ort_artifact4), "--images", str(images), "--output", str(out), "--workers", "0"]) == 0
    assert summary(out)["batch_size"] == 4 and (out / "perf_vision_batchsize_4_device_0.txt").is_file()
    assert_same_detections(read_dumps(reference), read_dumps(out), "batch-4 artifact at its own batch")


def test_convert_never_replaces_what_is_not_an_artifact(model, tmp_path, capsys) -> None:
    """--output may name a new folder, an empty one or an earlier artifact; a file or someone's folder
    is refused before any work, and left as it was."""
    theirs = tmp_path / "models"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    src = tmp_path / "fcos.onnx"
    src.write_bytes(model.onnx.read_bytes())
    capsys.readouterr()
    assert main(["convert", "--model", str(src), "--output", str(theirs)]) == 2
    assert "other files" in _one_line_error(capsys) and (theirs / "notes.txt").read_text() == "mine"
    assert main(["convert", "--model", str(src), "--output", str(src)]) == 2
    assert "is the input" in _one_line_error(capsys) and src.read_bytes() == model.onnx.read_bytes()
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.old"))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new", tmp_path / "new"):  # the second time: an earlier artifact, replaced
        assert main(["convert", "--model", str(src), "--output", str(out)]) == 0
        assert (out / "artifact.json").is_file()


def test_bad_images_are_skipped_while_streaming(reference, model, images, tmp_path, capsys) -> None:
    """Streaming skips what preprocess skips (empty, truncated, undecodable, too thin to letterbox): exit 3."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_empty.jpg").write_bytes(b"")
    good = (images / "img00.jpg").read_bytes()
    (folder / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "zz_text.png").write_text("not an image")
    assert cv2.imwrite(str(folder / "zz_thin.png"), np.full((1, 4000, 3), 128, np.uint8))  # 0 rows on 256x384
    out = tmp_path / "out"
    code = main(["infer", "--model", str(model.onnx), "--images", str(folder), "--output", str(out), "--batch-size", "3"])
    err = capsys.readouterr().err
    assert code == 3, err
    s = summary(out)
    assert sorted(Path(k["path"]).name for k in s["skipped"]) == ["zz_empty.jpg", "zz_text.png", "zz_thin.png", "zz_truncated.jpg"]
    assert s["num_inferred"] == NUM_IMAGES and "Traceback" not in err
    assert dump_bytes(out) == dump_bytes(reference)


def test_convert_with_onnxruntime_says_in_one_line_that_the_layout_is_this_cpus(model, tmp_path, capfd) -> None:
    """ONNX Runtime's own multi-line warning about a hardware-specific optimised model is replaced by one line of ours."""
    capfd.readouterr()
    assert main(["convert", "--model", str(model.onnx), "--engine", "onnxruntime", "--output", str(tmp_path / "art")]) == 0
    err = capfd.readouterr().err
    assert "Serializing optimized model" not in err and "\x1b[" not in err
    assert "lay the graph out for this CPU's instruction set" in err
