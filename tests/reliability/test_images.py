"""Reliability: bad and unusual images through every verb that reads images.

Two folders: ``broken/`` (a 0-byte file, a truncated JPEG, a text file named .jpg, plus good JPEGs)
and ``unusual/`` (PNG with alpha, 16-bit PNG, grayscale JPEG, CMYK JPEG, EXIF-rotated JPEG, 1x1,
10000x100, plus good JPEGs). Broken files are skipped with one line naming the file and the
problem, listed in the verb's summary, exit 3. Unusual pictures are processed (exit 0) and their
tensors equal ``cv2.imread(IMREAD_COLOR)`` + the recipe's letterbox computed independently here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from badinputs import (
    CANVAS,
    IMAGE_CASES,
    annotation_json,
    assert_clean,
    cli,
    console_script,
    dump_files,
    good_jpeg,
    image_corpus,
    image_sizes,
    imread_tensor,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
    write_json,
    wrong_size_bin,
)

from fcos_offline.data.info import read_info

H, W = CANVAS
BAD = [c for c in IMAGE_CASES if c.skip]
UNUSUAL = [c for c in IMAGE_CASES if not c.skip]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("corpus")
    broken, unusual = root / "broken", root / "unusual"
    return SimpleNamespace(broken=broken, unusual=unusual, bad=image_corpus(broken, good=2, skip=True), odd=image_corpus(unusual, good=1, skip=False))


def _infer_images(tiny, folder: Path, out: Path) -> tuple[int, str, Path]:
    """``infer --images`` through the console script (streaming, one preprocessing worker process)."""
    proc = subprocess.run(
        [*console_script(), "infer", "--model", str(tiny.onnx), "--images", str(folder), "--output", str(out), "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr, out


@pytest.fixture(scope="module")
def streamed(corpus, tiny, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("streamed")
    return SimpleNamespace(bad=_infer_images(tiny, corpus.broken, root / "broken"), odd=_infer_images(tiny, corpus.unusual, root / "unusual"))


def _preprocess(capsys, folder: Path, bins: Path) -> tuple[int, str, str]:
    return cli(
        capsys, "preprocess", "--image-src-path", folder, "--bin-file-path", bins, "--model-input-height", H, "--model-input-width", W, "--workers", 1
    )


def test_preprocess_skips_broken_images(corpus, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    code, out, err = _preprocess(capsys, corpus.broken, bins)
    assert_clean(code, out, err, 3, *(corpus.bad[c.name].name for c in BAD))
    for case in BAD:
        path = corpus.bad[case.name]
        line = record(case.name, "preprocess", code, err + out, "skipped, named on stderr and listed in preprocess.json", path.name)
        assert case.skip in line, line
        assert not (bins / f"{path.stem}.bin").exists()
    assert f"{len(BAD)} skipped" in out and sorted(p.name for p in bins.glob("*.bin")) == ["good0.bin", "good1.bin"]


def test_preprocess_processes_unusual_images_like_imread(corpus, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    code, out, err = _preprocess(capsys, corpus.unusual, bins)
    assert_clean(code, out, err, 0)
    for case in UNUSUAL:
        path = corpus.odd[case.name]
        got = np.fromfile(bins / f"{path.stem}.bin", np.float32).reshape(3, H, W)
        np.testing.assert_array_equal(got, imread_tensor(path), err_msg=case.name)
        record(case.name, "preprocess", code, out, "processed: the .bin equals cv2.imread + recipe letterbox", "wrote")
    assert "0 skipped" in out and not [p for p in bins.iterdir() if ".part" in p.name]


def test_preprocess_console_script_with_worker_processes(corpus, tmp_path) -> None:
    """The installed entry point with a pool of worker processes: same skips, same tensors."""
    bins = tmp_path / "bins"
    for folder in (corpus.broken, corpus.unusual):
        proc = subprocess.run(
            [
                *console_script(),
                "preprocess",
                "--image_src_path",
                str(folder),
                "--bin_file_path",
                str(bins),
                "--model_input_height",
                str(H),
                "--model_input_width",
                str(W),
                "--workers",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        bad = [corpus.bad[c.name].name for c in BAD] if folder == corpus.broken else []
        assert_clean(proc.returncode, proc.stdout, proc.stderr, 3 if bad else 0, *bad)
    expected = sorted({p.stem for p in [*corpus.bad.values(), *corpus.odd.values()]} - {corpus.bad[c.name].stem for c in BAD})
    assert sorted(p.stem for p in bins.glob("*.bin")) == expected
    for case in UNUSUAL:
        path = corpus.odd[case.name]
        np.testing.assert_array_equal(np.fromfile(bins / f"{path.stem}.bin", np.float32).reshape(3, H, W), imread_tensor(path))


def test_get_info_jpg(corpus, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "get-info", "jpg", corpus.broken, tmp_path / "broken.info", "--workers", 1)
    assert_clean(code, out, err, 3, *(corpus.bad[c.name].name for c in BAD))
    listed = {Path(e.path).name for e in read_info(tmp_path / "broken.info")}
    for case in BAD:
        path = corpus.bad[case.name]
        line = record(case.name, "get-info", code, err + out, "skipped, listed in the summary; no .info line", path.name)
        assert case.skip in line and path.name not in listed

    code, out, err = cli(capsys, "get-info", "jpg", corpus.unusual, tmp_path / "odd.info", "--workers", 1)
    assert_clean(code, out, err, 0)
    entries = {Path(e.path).name: e for e in read_info(tmp_path / "odd.info")}
    for case in UNUSUAL:
        path = corpus.odd[case.name]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert (entries[path.name].width, entries[path.name].height) == (img.shape[1], img.shape[0]), case.name
        record(case.name, "get-info", code, out, "listed with the size cv2.imread decodes (EXIF applied)", "wrote")
    assert entries[corpus.odd["EXIF-rotated JPEG"].name][2:] == (64, 96)  # 96x64 stored, rotated by EXIF


def test_get_info_bin_skips_a_tensor_of_the_wrong_size(corpus, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    assert _preprocess(capsys, corpus.unusual, bins)[0] == 0
    bad = wrong_size_bin(bins)
    code, out, err = cli(capsys, "get-info", "bin", bins, tmp_path / "fcos.info", W, H)
    assert_clean(code, out, err, 3, bad.name)
    line = record(".bin of the wrong size", "get-info", code, err + out, "skipped, listed in the summary", bad.name)
    assert "1000 bytes, expected 294912" in line
    assert len(read_info(tmp_path / "fcos.info")) == len(list(bins.glob("*.bin"))) - 1


def test_infer_streaming_skips_broken_images(corpus, streamed) -> None:
    code, text, out = streamed.bad
    assert_clean(code, "", text, 3, *(corpus.bad[c.name].name for c in BAD))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(s["path"]).name for s in summary["skipped"]) == sorted(corpus.bad[c.name].name for c in BAD)
    assert summary["num_inferred"] == 2 and set(dump_files(out)) == {f"good{i}_{k}.bin" for i in range(2) for k in (1, 2)}
    for case in BAD:
        line = record(case.name, "infer", code, text, "skipped with a warning, listed in summary.json 'skipped'", corpus.bad[case.name].name)
        assert case.skip in line


def test_infer_streaming_infers_unusual_images_like_imread(corpus, streamed, tiny) -> None:
    from fcos_offline.engine.backends import EngineOptions, open_engine

    code, text, out = streamed.odd
    assert_clean(code, "", text, 0)
    engine = open_engine(tiny.onnx, EngineOptions(batch_size=1))
    dumps = dump_files(out)
    for case in UNUSUAL:
        path = corpus.odd[case.name]
        dets, labels = engine.run(imread_tensor(path)[None])
        assert dumps[f"{path.stem}_1.bin"] == labels[0].astype("<i8").tobytes(), case.name
        np.testing.assert_allclose(np.frombuffer(dumps[f"{path.stem}_2.bin"], "<f4").reshape(-1, 5), dets[0], rtol=1e-5, atol=1e-3, err_msg=case.name)
        record(case.name, "infer", code, text, "inferred: dumps equal the engine run on the cv2.imread + recipe tensor", "images inferred")


def _run(capsys, tiny, folder: Path, paths, work: Path) -> tuple[int, str, str, dict]:
    ann = write_json(work.parent / f"{work.name}.json", annotation_json(image_sizes(paths.values())))
    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        tiny.ckpt,
        "--images",
        folder,
        "--annotations",
        ann,
        "--shape",
        H,
        W,
        "--batch-sizes",
        1,
        "--engines",
        "onnxruntime",
        "--no-online",
        "--workdir",
        work,
    )
    report = json.loads((work / "report.json").read_text()) if (work / "report.json").is_file() else {}
    return code, out, err, report


def test_run_skips_broken_images_and_reports_them(corpus, tiny, tmp_path, capsys) -> None:
    code, out, err, report = _run(capsys, tiny, corpus.broken, corpus.bad, tmp_path / "work")
    assert_clean(code, out, err, 3, *(corpus.bad[c.name].name for c in BAD))
    entry = report["entries"][0]
    assert sorted(Path(s["path"]).name for s in entry["skipped"]) == sorted(corpus.bad[c.name].name for c in BAD)
    for case in BAD:
        line = record(
            case.name,
            "run",
            code,
            err,
            "skipped with a warning, listed in report.json entries[].skipped; evaluated as an image without detections",
            corpus.bad[case.name].name,
        )
        assert case.skip in line


def test_run_processes_unusual_images(corpus, streamed, tiny, tmp_path, capsys) -> None:
    code, out, err, report = _run(capsys, tiny, corpus.unusual, corpus.odd, tmp_path / "work")
    assert_clean(code, out, err, 0)
    entry = report["entries"][0]
    assert not entry["skipped"] and entry["num_images"] == len(corpus.odd)
    streamed_dumps, run_dumps = dump_files(streamed.odd[2]), dump_files(Path(entry["dumps"]))
    for case in UNUSUAL:
        stem = corpus.odd[case.name].stem
        assert run_dumps[f"{stem}_1.bin"] == streamed_dumps[f"{stem}_1.bin"], case.name  # the same as infer gives
        record(case.name, "run", code, out, "inferred and evaluated (same labels as infer --images)", "report:")


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_tune_meets_a_broken_eval_image(case, tiny, tmp_path, capsys) -> None:
    """tune evaluates every configuration on the same images; its behaviour is recorded."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = [good_jpeg(folder, f"good{i}.jpg", seed=200 + i) for i in range(2)]
    bad = case.build(folder)
    ann = write_json(tmp_path / "instances.json", annotation_json(image_sizes([*good, bad])))
    code, out, err = cli(
        capsys,
        "tune",
        "--model",
        tiny.onnx,
        "--images",
        folder,
        "--annotations",
        ann,
        "--output",
        tmp_path / "tuned",
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
        1,
        "--no-fallback",
        "--no-sweep",
    )
    assert code in (1, 3), (code, err[-2000:])
    assert "Traceback" not in out + err
    line = record(case.name, "tune", code, err, "stops at the unreadable evaluation image (exit 1)" if code == 1 else "skipped", bad.name)
    assert bad.name in line and case.skip in line, err[-2000:]
