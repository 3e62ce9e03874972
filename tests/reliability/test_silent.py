"""Reliability: nothing silently wrong — stale reuse, vacuous checks and unchecked inputs.

Each class below once gave a wrong number with exit 0, a crash, a hang or a file written where
the user did not ask; each test states the behaviour we want (docs/reliability.md, one section
per class):

1. a reused work folder recomputes whatever its model, canvas, thresholds or images changed;
2. dumps of any number of detections per image are read (the pair's sizes tell it);
3. export verification compares the raw head outputs; NaN/inf or integer weights are refused;
4. annotations are validated (shared file stems, repeated ids, negative boxes, orphans), and
   postprocess takes the canvas infer recorded;
5. skips are reported the same way in every mode (``run --write-bins`` too);
6.–10. no crash, hang or blow-up: zero batch, devices as inputs, absurd threads/batches,
   tune's folders, giant images and canvases;
11. every numeric flag of every verb is range-checked (enumerated from the parsers);
12. nothing is written outside the output folder, and a failed export keeps the good model;
13.–15. torchvision BN counters, inert meta objects, malformed files named in one line, empty
   lists, dangling links, line breaks in names, Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from badinputs import (
    CANVAS,
    annotation_json,
    assert_clean,
    cli,
    console_script,
    dump_files,
    good_jpeg,
    image_sizes,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
    write_json,
)

H, W = CANVAS


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> SimpleNamespace:
    """Eight demo validation images (the shipped demo model detects them: mAP is meaningful)."""
    from fcos_offline.demo.synthetic import make_demo_data

    root = tmp_path_factory.mktemp("silent_demo")
    make_demo_data(root / "a", "val", 8, seed=1000)
    make_demo_data(root / "b", "val", 8, seed=1234)
    return SimpleNamespace(root=root, a=root / "a", b=root / "b")


def _demo_run(capsys, data: Path, work: Path, *extra: object) -> tuple[int, str, str, dict]:
    from fcos_offline.demo import DEMO_CHECKPOINT

    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        DEMO_CHECKPOINT,
        "--images",
        data / "val2017",
        "--annotations",
        data / "annotations",
        "--engines",
        "onnxruntime",
        "--batch-sizes",
        2,
        "--no-online",
        "--vis-images",
        0,
        "--workdir",
        work,
        *extra,
    )
    report = json.loads((work / "report.json").read_text()) if code in (0, 3) else {}
    return code, out, err, report


def _same_as_fresh(reused: dict, fresh: dict) -> None:
    a, b = reused["entries"][0], fresh["entries"][0]
    assert a["bbox_mAP"] == b["bbox_mAP"] and a["num_images"] == b["num_images"], (a["bbox_mAP"], b["bbox_mAP"])
    assert dump_files(Path(a["dumps"])) == dump_files(Path(b["dumps"]))


# --------------------------------------------------------------------------- 1. stale reuse


@pytest.mark.parametrize("change", ["canvas", "image set", "score threshold"])
def test_a_reused_workdir_recomputes_what_changed(change, demo, tmp_path, capsys) -> None:
    first = {"canvas": ("--shape", 320, 512), "image set": ("--shape", 320, 512), "score threshold": ("--shape", 320, 512)}[change]
    second = {
        "canvas": ("--shape", 384, 640),
        "image set": ("--shape", 320, 512, "--num-images", 5),
        "score threshold": ("--shape", 320, 512, "--score-thr", 0.3),
    }[change]
    data2 = demo.b if change == "image set" else demo.a
    work = tmp_path / "w"
    assert _demo_run(capsys, demo.a, work, *first)[0] == 0
    code, out, err, reused = _demo_run(capsys, data2, work, *second)
    assert_clean(code, out, err, 0)
    fresh = _demo_run(capsys, data2, tmp_path / "fresh", *second)[3]
    _same_as_fresh(reused, fresh)
    assert reused["entries"][0]["bbox_mAP"] > 0.2  # a real detector on its data: the comparison is not vacuous
    line = record(
        f"reused --workdir after a change of {change}",
        "run",
        code,
        err,
        "recomputed what the change affects (says so); same mAP and dump bytes as a fresh folder",
        "recomputing" if change != "score threshold" else "exporting again",
    )
    assert line


def test_a_checkpoint_rewritten_in_place_is_exported_again(tiny, tmp_path, capsys) -> None:
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    from fcos_offline.export.cache import cached_export

    ckpt = tmp_path / "model.pth"
    save_mmdet_ckpt(tiny_network(seed=1), ckpt)
    first, _ = cached_export(ckpt, tmp_path / "m", CANVAS)
    before = first.read_bytes()
    save_mmdet_ckpt(tiny_network(seed=2), ckpt)  # same path, other weights (mtime may even be equal)
    os.utime(ckpt, (0, 0))
    again, _ = cached_export(ckpt, tmp_path / "m", CANVAS)
    assert again.read_bytes() != before
    record(
        "checkpoint rewritten in place",
        "run",
        0,
        "exporting again: checkpoint, canvas or settings changed",
        "exported again (cache keyed by the checkpoint's bytes, not its path or mtime)",
        "exporting again",
    )


def test_a_fix_to_the_exported_graph_exports_again(tiny, tmp_path, monkeypatch, capsys) -> None:
    """Same checkpoint, canvas and settings, but a new graph revision (a fix to the network or its
    post-processing): the cached ONNX is not reused."""
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    import fcos_offline.export.cache as cache

    ckpt = tmp_path / "model.pth"
    save_mmdet_ckpt(tiny_network(seed=1), ckpt)
    cache.cached_export(ckpt, tmp_path / "m", CANVAS)
    cache.cached_export(ckpt, tmp_path / "m", CANVAS)
    assert "reusing" in capsys.readouterr().err
    monkeypatch.setattr(cache, "GRAPH_REVISION", cache.GRAPH_REVISION + 1)
    cache.cached_export(ckpt, tmp_path / "m", CANVAS)
    assert "exporting again" in capsys.readouterr().err


def test_resume_refuses_another_models_dumps(tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        good_jpeg(images, f"im{i}.jpg", seed=500 + i)
    out = tmp_path / "dumps"
    assert cli(capsys, "infer", "--model", tiny.onnx, "--images", images, "--output", out, "--workers", 0)[0] == 0
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    other = tmp_path / "other.pth"
    save_mmdet_ckpt(tiny_network(seed=5), other)
    code, out_, err = cli(capsys, "infer", "--checkpoint", other, "--shape", H, W, "--images", images, "--output", out, "--resume", "--workers", 0)
    assert_clean(code, out_, err, 1, "another model")
    record("infer --resume on another model's dumps", "infer", code, err, "refused in one line (would mix two models' dumps)", "another model")


# --------------------------------------------------------------------------- 2. any number of detections


def _postprocess(capsys, dumps: Path, info: Path, out: Path, ann: Path, *extra: object) -> tuple[int, str, str]:
    return cli(
        capsys, "postprocess", "--bin-data-path", dumps, "--test-annotation", info, "--det-results-path", out, "--annotations-path", ann, *extra
    )


def _gt_dumps(folder: Path, ann: dict, k: int, fmt: str = "bin", naming: str = "recipe") -> None:
    """Dumps holding exactly the ground truth (canvas pixels), K rows per image."""
    from fcos_offline.data.dumps import write_dumps
    from fcos_offline.data.letterbox import boxes_to_canvas, letterbox_for

    folder.mkdir(parents=True, exist_ok=True)
    cat_to_label = {1: 0, 3: 2}  # COCO-80 labels of person and car
    for img in ann["images"]:
        anns = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
        labels = np.full(k, -1, np.int64)
        dets = np.zeros((k, 5), np.float32)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        lb = letterbox_for(img["width"], img["height"], H, W)
        dets[: len(anns), :4] = boxes_to_canvas(boxes, lb)
        dets[: len(anns), 4] = 0.9
        labels[: len(anns)] = [cat_to_label[a["category_id"]] for a in anns]
        labels_path, dets_path = write_dumps(folder, Path(img["file_name"]).stem, labels, dets, fmt)
        if naming == "ais_bench":
            labels_path.rename(folder / f"{Path(img['file_name']).stem}_0.bin")
            dets_path.rename(folder / f"{Path(img['file_name']).stem}_1.bin")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("silent_photos")
    images = root / "images"
    images.mkdir()
    paths = [good_jpeg(images, f"im{i}.jpg", seed=600 + i, h=60 + 8 * i, w=90) for i in range(3)]
    ann = annotation_json(image_sizes(paths))
    from fcos_offline.data.info import make_info

    make_info("jpg", images, root / "jpg.info", workers=1)
    return SimpleNamespace(root=root, images=images, ann=ann, ann_file=write_json(root / "instances.json", ann), info=root / "jpg.info")


@pytest.mark.parametrize("k, fmt, naming", [(50, "bin", "recipe"), (5000, "bin", "recipe"), (50, "bin", "ais_bench"), (7, "npy", "recipe")])
def test_dumps_of_any_k_are_read(k, fmt, naming, photos, tmp_path, capsys) -> None:
    dumps = tmp_path / "dumps"
    _gt_dumps(dumps, photos.ann, k, fmt, naming)
    code, out, err = _postprocess(capsys, dumps, photos.info, tmp_path / "ret", photos.ann_file, "--net-input-height", H, "--net-input-width", W)
    assert_clean(code, out, err, 0)
    summary = json.loads((tmp_path / "ret" / "summary.json").read_text())
    assert summary["bbox_mAP"] == pytest.approx(1.0) and not summary["skipped"]
    record(
        f"dumps of {k} detections per image ({naming} naming, .{fmt})",
        "postprocess",
        code,
        out + err,
        "read (K from the pair's sizes); ground-truth dumps give mAP 1.0",
        "AP50",
    )


def test_run_with_max_per_img_50_evaluates(demo, tmp_path, capsys) -> None:
    code, out, err, report = _demo_run(capsys, demo.a, tmp_path / "w", "--max-per-img", 50)
    assert_clean(code, out, err, 0)
    assert report["entries"][0]["bbox_mAP"] > 0.2
    assert (Path(report["entries"][0]["dumps"]) / "000000000001_1.bin").stat().st_size == 8 * 50
    record("run --max-per-img 50", "run", code, out, "dumps of 50 detections evaluated (mAP as with 100)", "onnxruntime fp32 bs2")


# --------------------------------------------------------------------------- 3. vacuous verification


def _poisoned_checkpoint(folder: Path, how: str) -> Path:
    import torch
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    path = folder / f"{how.replace(' ', '_')}.pth"
    save_mmdet_ckpt(tiny_network(seed=3), path)
    ckpt = torch.load(path, weights_only=True)
    key = "bbox_head.conv_cls.weight"
    w = ckpt["state_dict"][key]
    if how == "NaN weights":
        w[0, 0, 0, 0] = float("nan")
    elif how == "inf weights":
        w[..., 0] = float("inf")
    else:
        ckpt["state_dict"][key] = torch.zeros_like(w, dtype=torch.int64)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("how", ["NaN weights", "inf weights", "integer weights"])
@pytest.mark.parametrize("verb", ["export", "run"])
def test_poisoned_weights_are_refused(how, verb, photos, tmp_path, capsys) -> None:
    ckpt = _poisoned_checkpoint(tmp_path, how)
    args = {
        "export": ["export", "--checkpoint", ckpt, "--output", tmp_path / "m.onnx", "--shape", H, W],
        "run": [
            "run",
            "--checkpoint",
            ckpt,
            "--images",
            photos.images,
            "--annotations",
            photos.ann_file,
            "--shape",
            H,
            W,
            "--engines",
            "onnxruntime",
            "--batch-sizes",
            1,
            "--no-online",
            "--workdir",
            tmp_path / "w",
        ],
    }[verb]
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 1, "bbox_head.conv_cls.weight")
    assert not (tmp_path / "m.onnx").exists()
    record(
        f"checkpoint with {how}",
        verb,
        code,
        err,
        "refused, naming the tensor (no vacuous '0/0 matched', no mAP 0 exit 0)",
        "bbox_head.conv_cls.weight",
    )


def test_export_verifies_raw_head_outputs_even_without_detections(tmp_path, capsys) -> None:
    """A model that detects nothing on the sample input still gets a numeric check of every raw output."""
    import torch
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    net = tiny_network(seed=4)
    with torch.no_grad():
        net.bbox_head.conv_cls.bias.fill_(-30.0)  # scores ~1e-13: no detection at all
    ckpt = tmp_path / "silent.pth"
    save_mmdet_ckpt(net, ckpt)
    code, out, err = cli(capsys, "export", "--checkpoint", ckpt, "--output", tmp_path / "m.onnx", "--shape", H, W)
    assert_clean(code, out, err, 0, "0/0 detections matched", "raw head outputs")
    raw_line = next(ln for ln in out.splitlines() if "raw head outputs" in ln)
    assert float(raw_line.split("relative error of ")[1].split()[0]) < 1e-3
    record(
        "model without detections on the sample input",
        "export",
        code,
        out,
        "raw head outputs (cls/reg/centerness per level) compared numerically as well",
        "raw head outputs",
    )


# --------------------------------------------------------------------------- 4. annotations taken on trust


def test_two_images_sharing_a_stem_are_refused(tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    paths = [good_jpeg(images, "x.jpg", seed=1), good_jpeg(images, "y.jpg", seed=2)]
    png = images / "x.png"
    import cv2

    cv2.imwrite(str(png), cv2.imread(str(paths[1])))
    ann = write_json(tmp_path / "instances.json", annotation_json(image_sizes([*paths, png])))
    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        tiny.ckpt,
        "--images",
        images,
        "--annotations",
        ann,
        "--shape",
        H,
        W,
        "--engines",
        "onnxruntime",
        "--batch-sizes",
        1,
        "--no-online",
        "--workdir",
        tmp_path / "w",
    )
    assert_clean(code, out, err, 1, "x.jpg", "x.png")
    record("X.jpg and X.png in one set", "run", code, err, "refused naming both (one image's dumps would count for both)", "x.png")
    dumps = tmp_path / "d"
    _gt_dumps(dumps, json.loads(ann.read_text()), 100)
    from fcos_offline.data.info import make_info

    make_info("jpg", images, tmp_path / "jpg.info", workers=1)
    code, out, err = _postprocess(capsys, dumps, tmp_path / "jpg.info", tmp_path / "ret", ann, "--net-input-height", H, "--net-input-width", W)
    assert_clean(code, out, err, 1, "x.jpg", "x.png")
    record("X.jpg and X.png in one set", "postprocess", code, err, "refused naming both", "x.png")


@pytest.mark.parametrize("case", ["repeated annotation id", "box of negative size", "annotation of an unlisted image"])
def test_annotation_files_are_validated(case, photos, tmp_path, capsys) -> None:
    ann = json.loads(json.dumps(photos.ann))
    if case == "repeated annotation id":
        ann["annotations"][1]["id"] = ann["annotations"][0]["id"]
        expected, needle = 1, "repeats annotation id"
    elif case == "box of negative size":
        ann["annotations"][0]["bbox"][2] = -5.0
        expected, needle = 1, "negative size"
    else:
        ann["annotations"].append({"id": 999, "image_id": 777, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})
        expected, needle = 0, "image_id 777"
    ann_file = write_json(tmp_path / "instances.json", ann)
    dumps = tmp_path / "d"
    _gt_dumps(dumps, photos.ann, 100)
    code, out, err = _postprocess(capsys, dumps, photos.info, tmp_path / "ret", ann_file, "--net-input-height", H, "--net-input-width", W)
    assert_clean(code, out, err, expected, needle, "instances.json")
    record(case, "postprocess", code, err, "an error naming the file and entry" if expected else "a warning naming it; ignored by COCO rules", needle)


def test_postprocess_takes_the_canvas_infer_recorded(tiny, photos, tmp_path, capsys) -> None:
    dumps = tmp_path / "dumps"
    assert cli(capsys, "infer", "--model", tiny.onnx, "--images", photos.images, "--output", dumps, "--workers", 0)[0] == 0
    explicit = _postprocess(capsys, dumps, photos.info, tmp_path / "a", photos.ann_file, "--net-input-height", H, "--net-input-width", W)
    code, out, err = _postprocess(capsys, dumps, photos.info, tmp_path / "b", photos.ann_file)  # the recipe's default flags say 800x1333
    assert explicit[0] == code == 0
    a = json.loads((tmp_path / "a" / "bbox_results.json").read_text())
    b = json.loads((tmp_path / "b" / "bbox_results.json").read_text())
    assert a == b and a  # same boxes as with the right canvas
    record(
        "postprocess without the canvas of a 128x192 run",
        "postprocess",
        code,
        out + err,
        "takes the canvas infer recorded in the dumps' summary.json",
        "AP50",
    )
    code, out, err = _postprocess(capsys, dumps, photos.info, tmp_path / "c", photos.ann_file, "--net-input-height", 800, "--net-input-width", 1333)
    assert_clean(code, out, err, 1, "128x192")
    record("postprocess with a canvas other than the dumps'", "postprocess", code, err, "refused: boxes would be mapped back wrong", "128x192")


# --------------------------------------------------------------------------- 5. skips in every mode


def test_run_write_bins_reports_a_zero_byte_image(tiny, photos, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for p in photos.images.iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "empty.jpg").write_bytes(b"")
    ann = dict(photos.ann, images=[*photos.ann["images"], {"id": 99, "file_name": "empty.jpg", "width": 96, "height": 72}])
    ann_file = write_json(tmp_path / "instances.json", ann)
    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        tiny.ckpt,
        "--images",
        images,
        "--annotations",
        ann_file,
        "--shape",
        H,
        W,
        "--engines",
        "onnxruntime",
        "--batch-sizes",
        1,
        "--no-online",
        "--write-bins",
        "--workdir",
        tmp_path / "w",
    )
    assert_clean(code, out, err, 3, "empty.jpg")
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert [Path(s["path"]).name for s in report["entries"][0]["skipped"]] == ["empty.jpg"]
    record("0-byte image with run --write-bins", "run", code, err, "named, skipped, listed in report.json, exit 3", "empty.jpg")


# --------------------------------------------------------------------------- 6.-10. crashes, hangs, blow-ups


def test_export_batch_size_zero_is_a_usage_error(tiny, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "export", "--checkpoint", tiny.ckpt, "--output", tmp_path / "m.onnx", "--batch-size", 0)
    assert_clean(code, out, err, 2, "--batch-size")
    assert err.strip().count("\n") == 0
    record("export --batch-size 0", "export", code, err, "usage error in one line (was: Floating point exception)", "--batch-size")


@pytest.mark.parametrize("verb", ["parse", "annotations", "postprocess", "infer"])
def test_a_device_as_input_is_refused_at_once(verb, tiny, photos, tmp_path, capsys) -> None:
    args = {
        "parse": ["parse", "/dev/zero"],
        "annotations": [
            "postprocess",
            "--bin-data-path",
            tmp_path,
            "--test-annotation",
            photos.info,
            "--annotations-path",
            "/dev/zero",
            "--det-results-path",
            tmp_path / "r",
            "--net-input-height",
            H,
            "--net-input-width",
            W,
        ],
        "postprocess": [
            "postprocess",
            "--bin-data-path",
            tmp_path,
            "--test-annotation",
            "/dev/zero",
            "--annotations-path",
            photos.ann_file,
            "--det-results-path",
            tmp_path / "r",
            "--net-input-height",
            H,
            "--net-input-width",
            W,
        ],
        "infer": ["infer", "--model", tiny.onnx, "--input-info", "/dev/zero", "--output", tmp_path / "d"],
    }[verb]
    t0 = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert time.perf_counter() - t0 < 20
    assert_clean(code, out, err, 1, "/dev/zero")
    what = {"annotations": "annotation file", "postprocess": ".info file", "parse": "perf file", "infer": ".info file"}[verb]
    record(
        f"/dev/zero as the {what}",
        verb if verb != "annotations" else "postprocess",
        code,
        err,
        "refused at once without reading it (every text/JSON input is bounded)",
        "/dev/zero",
    )


def test_absurd_threads_and_batches_are_capped(tiny, photos, tmp_path, capsys) -> None:
    t0 = time.perf_counter()
    code, out, err = cli(
        capsys,
        "infer",
        "--model",
        tiny.onnx,
        "--images",
        photos.images,
        "--output",
        tmp_path / "d",
        "--threads",
        1000,
        "--batch-size",
        1000,
        "--workers",
        0,
    )
    assert_clean(code, out, err, 0, "--threads 1000", "batch size 1000")
    assert time.perf_counter() - t0 < 60
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["engine"]["threads"] <= (os.cpu_count() or 1) and summary["batch_size"] == 3
    record(
        "infer --threads 1000 --batch-size 1000 on 3 images", "infer", code, err, "capped to the cores and images present, said so", "--threads 1000"
    )
    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        tiny.ckpt,
        "--images",
        photos.images,
        "--annotations",
        photos.ann_file,
        "--shape",
        H,
        W,
        "--engines",
        "onnxruntime",
        "--batch-sizes",
        1000,
        "--no-online",
        "--workdir",
        tmp_path / "w",
    )
    assert_clean(code, out, err, 0, "batch size 1000")
    record("run --batch-sizes 1000 on 3 images", "run", code, err, "capped to the images present, said so", "batch size 1000")


def test_tune_with_onnxruntime_only_on_a_fresh_folder(tiny, photos, tmp_path, capsys) -> None:
    code, out, err = cli(
        capsys,
        "tune",
        "--model",
        tiny.onnx,
        "--images",
        photos.images,
        "--annotations",
        photos.ann_file,
        "--output",
        tmp_path / "fresh" / "t",
        "--engines",
        "onnxruntime",
        "--calib-methods",
        "minmax",
        "--eval-images",
        3,
        "--calib-images",
        2,
        "--threads",
        1,
        "--bench-runs",
        1,
        "--bench-seconds",
        0.1,
        "--no-sweep",
        "--no-fallback",
    )
    assert code in (0, 3) and "Traceback" not in out + err
    result = json.loads((tmp_path / "fresh" / "t" / "tune.json").read_text())
    assert any(t["precision"] == "int8" for t in result["trials"]), result["skipped"]
    assert not [s for s in result["skipped"] if "FileNotFoundError" in s["reason"]]
    record(
        "tune --engines onnxruntime on a fresh output folder",
        "tune",
        code,
        out + err,
        "int8 trials built and measured",
        "int8" if "int8" in out else None,
    )


def _huge_png(path: Path, side: int = 32000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("verb", ["preprocess", "infer"])
def test_an_image_declaring_a_billion_pixels_is_refused_before_decoding(verb, tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    _huge_png(images / "huge.png")
    args = {
        "preprocess": [
            "preprocess",
            "--image-src-path",
            images,
            "--bin-file-path",
            tmp_path / "b",
            "--model-input-height",
            H,
            "--model-input-width",
            W,
            "--workers",
            1,
        ],
        "infer": ["infer", "--model", tiny.onnx, "--images", images, "--output", tmp_path / "d", "--workers", 0],
    }[verb]
    t0 = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert time.perf_counter() - t0 < 30
    assert_clean(code, out, err, 3, "huge.png", "32000x32000")
    record("PNG declaring 32000x32000 pixels", verb, code, out + err, "skipped before decoding (pixel limit, FCOS_OFFLINE_MAX_PIXELS)", "32000x32000")


def test_a_model_declaring_a_giant_canvas_is_refused(tmp_path, capsys) -> None:
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 100000, 100000])
    dets = helper.make_tensor_value_info("dets", TensorProto.FLOAT, [1, 100, 5])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 100])
    nodes = [
        helper.make_node("Constant", [], ["dets"], value=helper.make_tensor("d", TensorProto.FLOAT, [1, 100, 5], [0.0] * 500)),
        helper.make_node("Constant", [], ["labels"], value=helper.make_tensor("l", TensorProto.INT64, [1, 100], [-1] * 100)),
    ]
    model = helper.make_model(helper.make_graph(nodes, "giant", [inp], [dets, labels]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "giant.onnx"
    onnx.save(model, str(path))
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    t0 = time.perf_counter()
    code, out, err = cli(capsys, "infer", "--model", path, "--images", images, "--output", tmp_path / "d")
    assert time.perf_counter() - t0 < 20
    assert_clean(code, out, err, 1, "100000x100000")
    record("model declaring a 100000x100000 input", "infer", code, err, "refused up front (canvas sanity check)", "100000x100000")


# --------------------------------------------------------------------------- 11. every numeric flag


def _numeric_options() -> list[tuple[str, list[str], argparse.Action]]:
    from fcos_offline.cli import _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for verb, p in sub.choices.items():
        for action in p._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in ("int", "float"):
                found.append((verb, action.option_strings, action))
    return found


def test_every_numeric_flag_is_range_checked() -> None:
    """No numeric option takes a plain int/float: each parses through a range-checked type."""
    options = _numeric_options()
    assert len(options) >= 40
    unchecked = [(v, o) for v, o, a in options if not hasattr(a.type, "low")]
    assert not unchecked, unchecked


def _out_of_range(action: argparse.Action) -> str:
    t = action.type
    if t.low is not None:  # type: ignore[union-attr]
        return str(t.low if t.low_open else t.low - 1)  # type: ignore[union-attr]
    return str(t.high * 10 + 1)  # type: ignore[union-attr]


@pytest.mark.parametrize("verb, option, action", _numeric_options(), ids=lambda v: v if isinstance(v, str) else "")
def test_an_out_of_range_value_is_one_usage_line(verb, option, action, capsys) -> None:
    bad = _out_of_range(action)
    nargs = action.nargs if isinstance(action.nargs, int) else 1
    if option:
        args = [verb, option[0], *([bad] * nargs)]
    else:  # get-info's positional WIDTH HEIGHT
        args = [verb, "bin", ".", "x.info", bad, bad]
    code, out, err = cli(capsys, *args)
    assert code == 2, (args, code, err)
    assert err.strip().count("\n") == 0 and "Traceback" not in err and "must be" in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["export", "--checkpoint", "x.pth", "--output", "m.onnx", "--shape", "0", "0"], "--shape"),
        (["export", "--checkpoint", "x.pth", "--output", "m.onnx", "--opset", "99"], "--opset"),
        (["run", "--num-images", "-1"], "--num-images"),
        (["run", "--num-images", "0"], "--num-images"),
        (["parse", "x.txt", "--chips", "-4"], "--chips"),
    ],
)
def test_the_reported_flag_cases(args, needle, capsys) -> None:
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 2, needle)
    record(
        f"{args[0]} {needle} {args[args.index(needle) + 1] if needle in args else ''}".strip(),
        args[0],
        code,
        err,
        "usage error in one line naming the flag and its range",
        needle,
    )


# --------------------------------------------------------------------------- 12. nothing written elsewhere


def test_make_demo_data_split_cannot_escape_the_output(tmp_path, capsys) -> None:
    out = tmp_path / "a" / "b" / "out"
    code, out_, err = cli(capsys, "make-demo-data", "--out", out, "--split", "../../x", "--num-images", 1)
    assert_clean(code, out_, err, 1, "../../x")
    assert not list((tmp_path / "a").rglob("*2017"))
    record("make-demo-data --split ../../x", "make-demo-data", code, err, "refused; nothing written outside --out", "../../x")


def test_a_failed_export_keeps_the_existing_model(tiny, tmp_path, capsys) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(tiny.onnx.read_bytes())
    ckpt = _poisoned_checkpoint(tmp_path, "NaN weights")
    code, out, err = cli(capsys, "export", "--checkpoint", ckpt, "--output", target, "--shape", H, W)
    assert code == 1 and target.read_bytes() == tiny.onnx.read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]
    record("failed export onto an existing model", "export", code, err, "the existing model is left as it was", "NaN")


# --------------------------------------------------------------------------- 13.-15. files


def test_torchvision_checkpoint_with_bn_counters_loads(tmp_path, capsys) -> None:
    import torch
    from conftest import make_fcos, save_torchvision_ckpt

    path = tmp_path / "tv.pth"
    save_torchvision_ckpt(make_fcos(layout="torchvision", num_classes=91, seed=6), path)
    sd = torch.load(path, weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    bn_keys = [k for k in sd if k.endswith("running_var")]
    assert bn_keys
    for k in bn_keys:
        sd[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(100)
    torch.save(sd, path)
    code, out, err = cli(capsys, "inspect", path, "--json")
    assert_clean(code, out, err, 0)
    assert json.loads(out)["format"] == "torchvision"
    record("torchvision checkpoint with num_batches_tracked", "inspect", code, out, "loaded (the counters are ignored, as torchvision does)", None)


@pytest.mark.parametrize("kind", ["frozenset", "range", "slice", "defaultdict"])
def test_inert_meta_objects_load(kind, tmp_path, capsys) -> None:
    import collections

    import torch
    from badinputs import tiny_network
    from conftest import save_mmdet_ckpt

    path = tmp_path / "m.pth"
    save_mmdet_ckpt(tiny_network(seed=7), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["odd"] = {"frozenset": frozenset({1}), "range": range(3), "slice": slice(1, 2), "defaultdict": collections.defaultdict(list, a=[1])}[
        kind
    ]
    torch.save(ckpt, path)
    code, out, err = cli(capsys, "inspect", path)
    assert_clean(code, out, err, 0)
    assert "weights_only" not in out + err
    record(f"checkpoint meta holding a {kind}", "inspect", code, out, "loaded; never a suggestion to load unsafely", None)


@pytest.mark.parametrize("case", ["truncated JSON", "list instead of object", "model_file outside the folder"])
def test_a_broken_artifact_json_is_named(case, tiny, photos, tmp_path, capsys) -> None:
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(tiny.onnx.read_bytes())
    text = {
        "truncated JSON": '{"engine": "onnxruntime", "model_fi',
        "list instead of object": "[1, 2]",
        "model_file outside the folder": json.dumps(
            {"engine": "onnxruntime", "model_file": "../model.onnx", "batch_size": 1, "input_shape": [1, 3, H, W]}
        ),
    }[case]
    (folder / "artifact.json").write_text(text)
    code, out, err = cli(capsys, "infer", "--model", folder, "--images", photos.images, "--output", tmp_path / "d")
    assert_clean(code, out, err, 1, "artifact.json")
    assert err.strip().count("\n") == 0
    record(f"artifact.json: {case}", "infer", code, err, "one line naming the file", "artifact.json")


def test_an_empty_info_is_an_error_without_a_perf_file(tiny, tmp_path, capsys) -> None:
    info = tmp_path / "empty.info"
    info.write_text("")
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "d" / "dumpOutput_device0")
    assert_clean(code, out, err, 1, "empty.info")
    assert not list(tmp_path.rglob("perf_*.txt"))
    record("empty .info", "infer", code, err, "error naming it (was: exit 0 with a perf file of nothing)", "empty.info")


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink loop"])
@pytest.mark.parametrize("verb", ["get-info", "infer"])
def test_broken_links_in_an_image_folder_are_named(kind, verb, tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    link = images / "link.jpg"
    if kind == "dangling symlink":
        os.symlink(tmp_path / "nowhere.jpg", link)
    else:
        os.symlink(link, link)
    args = {
        "get-info": ["get-info", "jpg", images, tmp_path / "x.info", "--workers", 1],
        "infer": ["infer", "--model", tiny.onnx, "--images", images, "--output", tmp_path / "d", "--workers", 0],
    }[verb]
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 3, "link.jpg")
    record(f"{kind} in an image folder", verb, code, out + err, "named, skipped and listed, exit 3", "link.jpg")


def test_a_file_name_with_a_line_break_is_named(tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    good_jpeg(images, "two\nlines.jpg")
    code, out, err = cli(capsys, "get-info", "jpg", images, tmp_path / "x.info", "--workers", 1)
    assert_clean(code, out, err, 3, "line break")
    assert len((tmp_path / "x.info").read_text().splitlines()) == 1
    record("file name with a line break", "get-info", code, out + err, "skipped and named (an .info line cannot hold it)", "line break")


def test_ctrl_c_during_streaming_infer_prints_one_line(tiny, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(100):
        good_jpeg(images, f"im{i:04d}.jpg", seed=i, h=240, w=320)
    for i in range(100, 3000):  # a run of ~40 s here, so that the interrupt always lands mid-stream (hard links: cheap)
        os.link(images / f"im{i % 100:04d}.jpg", images / f"im{i:04d}.jpg")
    proc = subprocess.Popen(
        [*console_script(), "infer", "--model", str(tiny.onnx), "--images", str(images), "--output", str(tmp_path / "d"), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as from a terminal: a runner started in the background (`cmd &` in a script) ignores SIGINT, and its children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "d").glob("*_2.bin")):
        time.sleep(0.05)
    assert proc.poll() is None, "infer ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    record("Ctrl-C during streaming infer", "infer", proc.returncode, err, "stops with one line, no worker traceback", "interrupted")


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the device and link cases are Linux-specific", allow_module_level=True)
