"""Reliability: nothing silently wrong, part 2 (issue #26) — each test once hung, lied or buried its message.

5. a named pipe as an input (``.info``, ``--class-names``, perf file, an image in a folder) is
   refused or skipped by name at once, never waited on;
7. ``postprocess`` on dumps without infer's ``summary.json`` needs the canvas, never guesses 800x1333;
10. ``--workers`` above the cores is capped to them and said so;
16. ``.info`` paths with runs of spaces round-trip; JPEGs libjpeg reports as corrupt are skipped by name;
low: non-finite or negative perf numbers, implausible boxes, 20 000 identical warnings, a dying decode worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from badinputs import (
    CANVAS,
    annotation_json,
    assert_clean,
    cli,
    good_jpeg,
    image_sizes,
    jpeg_bytes,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
    write_json,
)

H, W = CANVAS


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("silent2_photos")
    images = root / "images"
    images.mkdir()
    paths = [good_jpeg(images, f"im{i}.jpg", seed=700 + i, h=60 + 8 * i, w=90) for i in range(3)]
    ann = annotation_json(image_sizes(paths))
    from fcos_offline.data.info import make_info

    make_info("jpg", images, root / "jpg.info", workers=1)
    return SimpleNamespace(root=root, images=images, ann=ann, ann_file=write_json(root / "instances.json", ann), info=root / "jpg.info")


# --------------------------------------------------------------------------- 5. named pipes


@pytest.fixture
def fifo() -> Iterator[Callable[[Path], Path]]:
    """Makes named pipes; if a reader still waits on one after 15 s (the old behaviour), a writer opens
    and closes it, so that the test ends (and fails on the time) instead of hanging."""
    made: list[Path] = []
    done = threading.Event()

    def unblock() -> None:
        if done.wait(15):
            return
        while not done.is_set():
            for path in made:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader (yet)
                    pass
            time.sleep(0.1)

    def make(path: Path) -> Path:
        os.mkfifo(path)
        made.append(path)
        return path

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield make
    done.set()
    thread.join(5)


@pytest.mark.parametrize("what", [".info", "class names", "perf file"])
def test_a_named_pipe_as_an_input_file_is_refused_at_once(what, fifo, tiny, photos, tmp_path, capsys) -> None:
    target = fifo(tmp_path / {".info": "x.info", "class names": "names.txt", "perf file": "perf_vision_batchsize_1_device_0.txt"}[what])
    args = {
        ".info": ["infer", "--model", tiny.onnx, "--input-info", target, "--output", tmp_path / "d"],
        "class names": [
            "postprocess",
            "--bin-data-path",
            tmp_path / "dumps",
            "--test-annotation",
            photos.info,
            "--annotations-path",
            photos.ann_file,
            "--det-results-path",
            tmp_path / "r",
            "--class-names",
            target,
        ],
        "perf file": ["parse", target],
    }[what]
    t0 = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert time.perf_counter() - t0 < 10, "waited on the pipe"
    assert_clean(code, out, err, 1, target.name, "not a regular file")
    record(f"a named pipe as the {what}", args[0], code, err, "refused at once, naming it (was: waited forever for a writer)", target.name)


@pytest.mark.parametrize("verb", ["get-info", "preprocess", "infer"])
def test_a_named_pipe_in_an_image_folder_is_skipped_by_name(verb, fifo, tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    fifo(images / "pipe.jpg")
    args = {
        "get-info": ["get-info", "jpg", images, tmp_path / "x.info", "--workers", 1],
        "preprocess": ["preprocess", "--image_src_path", images, "--bin_file_path", tmp_path / "bins", "--workers", 1],
        "infer": ["infer", "--model", tiny.onnx, "--images", images, "--output", tmp_path / "d", "--workers", 0],
    }[verb]
    t0 = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert time.perf_counter() - t0 < 10, "waited on the pipe"
    assert_clean(code, out, err, 3, "pipe.jpg", "not a regular file")
    record("a named pipe in an image folder", verb, code, out + err, "skipped by name, exit 3 (was: waited forever)", "pipe.jpg")


# --------------------------------------------------------------------------- 7. the canvas of dumps without summary.json


def _gt_dumps(folder: Path, ann: dict) -> None:
    """Dumps holding exactly the ground truth on the tiny model's canvas, as a killed infer leaves them (no summary.json)."""
    from fcos_offline.data.dumps import write_dumps
    from fcos_offline.data.letterbox import boxes_to_canvas, letterbox_for

    folder.mkdir(parents=True)
    for img in ann["images"]:
        anns = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
        labels, dets = np.full(100, -1, np.int64), np.zeros((100, 5), np.float32)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        dets[: len(anns), :4] = boxes_to_canvas(boxes, letterbox_for(img["width"], img["height"], H, W))
        dets[: len(anns), 4] = 0.9
        labels[: len(anns)] = [{1: 0, 3: 2}[a["category_id"]] for a in anns]
        write_dumps(folder, Path(img["file_name"]).stem, labels, dets)


def test_postprocess_without_a_recorded_canvas_needs_it(photos, tmp_path, capsys) -> None:
    dumps = tmp_path / "dumps"
    _gt_dumps(dumps, photos.ann)
    base = ["postprocess", "--bin-data-path", dumps, "--test-annotation", photos.info, "--annotations-path", photos.ann_file]
    code, out, err = cli(capsys, *base, "--det-results-path", tmp_path / "guessed")
    assert_clean(code, out, err, 2, "summary.json", "--net_input_height", "--net_input_width")
    assert not (tmp_path / "guessed" / "summary.json").exists()
    record(
        "postprocess on dumps without summary.json, no canvas given",
        "postprocess",
        code,
        err,
        "usage error asking for the canvas (was: 800x1333 guessed, wrong mAP, exit 0)",
        "--net_input_height",
    )
    code, out, err = cli(capsys, *base, "--det-results-path", tmp_path / "given", "--net_input_height", H, "--net_input_width", W)
    assert_clean(code, out, err, 0)
    assert json.loads((tmp_path / "given" / "summary.json").read_text())["bbox_mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- 10. --workers above the cores


@pytest.mark.parametrize("verb", ["get-info", "preprocess", "infer"])
def test_more_workers_than_cores_are_capped_and_said(verb, tiny, photos, tmp_path, capsys, monkeypatch) -> None:
    import fcos_offline.cpu

    monkeypatch.setattr(fcos_offline.cpu, "cpu_count", lambda: 1)
    args = {
        "get-info": ["get-info", "jpg", photos.images, tmp_path / "x.info"],
        "preprocess": ["preprocess", "--image_src_path", photos.images, "--bin_file_path", tmp_path / "bins"],
        "infer": ["infer", "--model", tiny.onnx, "--images", photos.images, "--output", tmp_path / "d"],
    }[verb]
    code, out, err = cli(capsys, *args, "--workers", 64)
    assert_clean(code, out, err, 0, "64 worker processes asked for", "the 1 cores this process may use; using 1")
    record("--workers 64 on fewer cores", verb, code, err, "capped to the cores, said in one line (was: 64 processes, GBs, slower)", "64 worker")


# --------------------------------------------------------------------------- 16. spaces in .info paths; corrupt JPEG data


def test_info_paths_with_runs_of_spaces_round_trip(tiny, tmp_path, capsys) -> None:
    from fcos_offline.data.info import make_info, read_info

    images = tmp_path / "a  b"
    images.mkdir()
    for name in ("x  y.jpg", "two   spaces .jpg", " lead.jpg"):
        good_jpeg(images, name)
    info = tmp_path / "jpg.info"
    written = make_info("jpg", images, info, workers=1).entries
    assert read_info(info) == written and all(Path(e.path).is_file() for e in written)
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "d", "--workers", 0)
    assert_clean(code, out, err, 0)
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["num_inferred"] == 3
    record("an .info path with two spaces in a row", "infer", code, err, "read verbatim (was: spaces collapsed, every image skipped)")


def _corrupt(kind: str) -> bytes:
    data = jpeg_bytes(seed=1)
    if kind == "truncated, fake EOI":
        return data[: len(data) * 2 // 3] + b"\xff\xd9"
    flipped = bytearray(data)
    start = data.rfind(b"\xff\xda") + 40  # inside the entropy-coded data
    for k in range(start, len(data) - 10, 97):
        flipped[k] ^= 0x5A
    return bytes(flipped)


@pytest.mark.parametrize("kind", ["truncated, fake EOI", "flipped bytes in the scan"])
def test_corrupt_jpeg_data_is_refused(kind) -> None:
    import cv2

    from fcos_offline.data.preprocess import decode_image
    from fcos_offline.errors import BadFileError

    data = _corrupt(kind)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV returns a picture
    with pytest.raises(BadFileError, match=r"corrupt JPEG .*Corrupt JPEG data"):
        decode_image(data, "bad.jpg")
    assert decode_image(jpeg_bytes(seed=1), "good.jpg").shape == (72, 96, 3)


def test_bytes_left_before_the_end_marker_name_both_readings() -> None:
    """libjpeg reports bit rot in the scan and padding after a whole picture alike ('N extraneous bytes before marker
    0xd9'): refused, with both readings and what to do about the second named."""
    from fcos_offline.data.preprocess import decode_image
    from fcos_offline.errors import BadFileError

    good = jpeg_bytes(seed=1)
    for data in (good[:-2] + b"\x00" * 10 + b"\xff\xd9", _corrupt("flipped bytes in the scan")):
        with pytest.raises(BadFileError, match=r"extraneous bytes before marker 0xd9\): bit rot in the scan, or padding .* re-save"):
            decode_image(data, "leftover.jpg")


@pytest.mark.parametrize("verb", ["preprocess", "infer (workers)"])
def test_corrupt_jpegs_are_skipped_by_name(verb, tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    (images / "fake_eoi.jpg").write_bytes(_corrupt("truncated, fake EOI"))
    (images / "bitrot.jpg").write_bytes(_corrupt("flipped bytes in the scan"))
    args = {
        "preprocess": ["preprocess", "--image_src_path", images, "--bin_file_path", tmp_path / "bins", "--workers", 2],
        "infer (workers)": ["infer", "--model", tiny.onnx, "--images", images, "--output", tmp_path / "d", "--workers", 1],
    }[verb]
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 3, "fake_eoi.jpg", "bitrot.jpg", "Corrupt JPEG data")
    record(
        "bit-rotted or cut JPEG with a fake EOI", verb.split()[0], code, out + err, "skipped by name, exit 3 (was: inferred, exit 0)", "bitrot.jpg"
    )


# --------------------------------------------------------------------------- low items


@pytest.mark.parametrize("value", ["nan", "-5", "1e999"])
def test_a_perf_file_with_an_impossible_rate_is_refused(value, tmp_path, capsys) -> None:
    perf = tmp_path / "perf_vision_batchsize_1_device_0.txt"
    perf.write_text(
        "[e2e] throughputRate: 24.3, latency: 2057\n[data read] throughputRate: 258.9, moduleLatency: 3.8\n"
        "[preprocess] throughputRate: 258.4, moduleLatency: 3.8\n"
        f"[infer] throughputRate: 24.4, Interface throughputRate: {value}, moduleLatency: 3.3\n"
        "[post] throughputRate: 244.4, moduleLatency: 4.0\n"
    )
    code, out, err = cli(capsys, "parse", perf)
    assert_clean(code, out, err, 1, "Interface throughputRate", value)
    record(f"perf file with Interface throughputRate {value}", "parse", code, err, "refused naming the field", "Interface throughputRate")


def test_implausible_boxes_are_counted_not_evaluated(photos, tmp_path, capsys) -> None:
    from fcos_offline.data.dumps import read_dumps, write_dumps

    dumps = tmp_path / "dumps"
    _gt_dumps(dumps, photos.ann)
    labels, dets = read_dumps(dumps)["im0"]
    dets = dets.copy()
    labels = labels.copy()
    dets[2:4] = [[50, 40, 10, 60, 0.95], [0, 0, 3e38, 3e38, 0.95]]  # inverted; overflowed
    labels[2:4] = 0
    write_dumps(dumps, "im0", labels, dets)
    code, out, err = cli(
        capsys, "postprocess", "--bin-data-path", dumps, "--test-annotation", photos.info, "--annotations-path", photos.ann_file,
        "--det-results-path", tmp_path / "r", "--net_input_height", H, "--net_input_width", W,
    )  # fmt: skip
    assert_clean(code, out, err, 3, "2 detection(s) in 1 image(s)", "im0")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["implausible_boxes"] == {"im0": 2} and summary["bbox_mAP"] == pytest.approx(1.0)
    record(
        "inverted and 3e38 boxes in dumps", "postprocess", code, err, "not evaluated, counted per image, exit 3 (was: silently clipped/scored)", "im0"
    )


def test_identical_warnings_are_capped(tiny, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good_jpeg(images, "ok.jpg")
    for i in range(25):
        (images / f"empty{i:02d}.jpg").write_bytes(b"")
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--images", images, "--output", tmp_path / "d", "--workers", 0)
    assert_clean(code, out, err, 3, "5 more 'skipped' warnings", "summary.json")
    assert sum("skipped " in line and "empty" in line for line in err.splitlines()) == 20
    assert len(json.loads((tmp_path / "d" / "summary.json").read_text())["skipped"]) == 25
    record("25 empty images", "infer", code, err, "20 named, then one line counting the rest (all in summary.json)", "more 'skipped'")


def test_a_dying_decode_worker_is_named(tmp_path) -> None:
    from fcos_offline.data.dataset import InputItem
    from fcos_offline.engine.infer import Feed
    from fcos_offline.errors import FcosError

    items = [InputItem(f"im{i}", str(good_jpeg(tmp_path, f"im{i}.jpg", seed=i)), "image") for i in range(12)]
    feed = Feed(items, CANVAS, workers=1, window=2)
    it = iter(feed)
    assert next(it).problem is None
    assert feed.pool is not None
    for pid in list(feed.pool._processes):  # the worker is killed (as the out-of-memory killer would)
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(FcosError, match=r"decode worker died .* reading \S*im\d+\.jpg"):
        list(it)


def test_run_in_a_workdir_with_two_spaces_in_its_name(tiny, photos, tmp_path, capsys) -> None:
    work = tmp_path / "a  b"
    code, out, err = cli(
        capsys, "run", "--checkpoint", tiny.ckpt, "--images", photos.images, "--annotations", photos.ann_file, "--shape", H, W,
        "--engines", "onnxruntime", "--batch-sizes", 1, "--no-online", "--workdir", work,
    )  # fmt: skip
    assert_clean(code, out, err, 0)
    assert [e["skipped"] for e in json.loads((work / "report.json").read_text())["entries"]] == [[]]
    record("run --workdir 'a  b'", "run", code, err, "runs as anywhere else (was: every image skipped, exit 3, nothing said)")


def test_a_named_pipe_named_like_our_stamp_is_not_read(tmp_path) -> None:
    """A FIFO where a key stamp (``.fcos-dumps.json``, ``summary.json``) would be: read_stamp says 'no stamp' at once
    (it waited forever for a writer)."""
    import subprocess
    import sys

    fifo = tmp_path / ".fcos-dumps.json"
    os.mkfifo(fifo)
    code = f"from fcos_offline.io import read_stamp; assert read_stamp({str(fifo)!r}) == {{}}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_info_columns_aligned_with_runs_of_spaces_still_name_the_files(tmp_path) -> None:
    """'0  a.jpg  640 480' or tab-separated columns parse to the file's path (a verbatim path kept the padding)."""
    from fcos_offline.data.info import read_info

    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg_bytes(seed=1))
    info = tmp_path / "aligned.info"
    info.write_text(f"0  {image}  96 72\n1\t{image}\t96\t72\n")
    assert [e.path for e in read_info(info)] == [str(image), str(image)]
