"""Reliability: an output never overlaps an input, one writer per output, and reuse is keyed on content.

1. every verb with an output refuses one that is, holds or lies inside one of its inputs (resolved
   paths, symlinks followed), in one line with exit 2, before anything is written or removed —
   ``compare --output X`` used to clear its side B when B lay in ``X/a/dumps`` and report a match;
2. a second ``infer`` or ``compare`` into a folder another one is writing is refused in one line;
   a killed holder leaves the folder free;
3. a fresh ``infer`` never removes the perf file an earlier ``summary.json`` names outside its folder;
4. the evaluation set's digest (what ``run`` and ``tune`` reuse by) follows the images' bytes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from badinputs import (
    CANVAS,
    assert_clean,
    cli,
    console_script,
    good_jpeg,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
)

from fcos_offline.errors import UsageError
from fcos_offline.io import OutputLock, check_output_apart

H, W = CANVAS


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        good_jpeg(folder, f"img{i}.jpg", seed=i)
    return folder


def _dumps(folder: Path, stems: tuple[str, ...] = ("img0", "img1"), seed: int = 0) -> Path:
    from fcos_offline.data.dumps import write_dumps

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem in stems:
        dets = np.zeros((100, 5), np.float32)
        dets[:3, :2] = rng.uniform(0, 50, (3, 2))
        dets[:3, 2:4] = dets[:3, :2] + 20
        dets[:3, 4] = 0.9
        labels = np.full(100, -1, np.int64)
        labels[:3] = [0, 1, 2]
        write_dumps(folder, stem, labels, dets)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- 1. outputs apart from inputs


def test_the_check_refuses_the_same_path_a_holding_folder_and_one_inside_followed_through_links(tmp_path) -> None:
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    model = inputs / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "link").symlink_to(inputs / "sub")
    for output, how in ((model, "is the input"), (inputs, "holds the input"), (inputs / "sub" / "out", "is inside the input")):
        with pytest.raises(UsageError, match=how):
            check_output_apart([output], [model if how != "is inside the input" else inputs])
    with pytest.raises(UsageError, match="is inside the input"):
        check_output_apart([tmp_path / "link" / "out"], [inputs / "sub"])  # a symlink does not hide it
    with pytest.raises(UsageError, match="holds the input"):
        check_output_apart([inputs], [tmp_path / "link"])
    check_output_apart([tmp_path / "out", None], [model, inputs, None, tmp_path / "not-there"])  # apart: fine
    check_output_apart([inputs / "list.info"], [inputs], inside_ok=True)  # a verb whose output there is never an input
    with pytest.raises(UsageError, match="holds the input"):
        check_output_apart([inputs], [model], inside_ok=True)


def test_compare_never_clears_a_side_that_lies_in_its_output(tiny, tmp_path, capsys, monkeypatch) -> None:
    """The issue's case: B is an earlier compare's ``a/dumps`` inside ``--output``; A's run used to remove it
    and compare A with itself ("within tolerance", exit 0). Also with the default ``--output compare``."""
    images = _images(tmp_path / "images")
    side_b = _dumps(tmp_path / "cmp" / "a" / "dumps")
    before = _snapshot(side_b)
    code, out, err = cli(capsys, "compare", tiny.onnx, side_b, "--images", images, "--output", tmp_path / "cmp")
    assert_clean(code, out, err, 2, "holds the input")
    line = record(
        "compare --output holding side B", "compare", code, err, "refused in one line; B untouched (was: B removed, A vs A 'within tolerance')"
    )
    assert "choose an output outside it" in _one_line(err) and line
    assert _snapshot(side_b) == before and not (tmp_path / "cmp" / "compare.json").exists()

    monkeypatch.chdir(tmp_path)
    default_b = _dumps(Path("compare") / "a" / "dumps")
    code, out, err = cli(capsys, "compare", tiny.onnx, default_b, "--images", images)
    assert_clean(code, out, err, 2, "holds the input")
    assert _snapshot(default_b) == before


def _overlap_cases(root: Path, tiny: SimpleNamespace) -> dict[str, tuple[list[object], Path]]:
    """verb -> (arguments whose output overlaps an input, the input folder that must stay as it was)."""
    images = _images(root / "images")
    models = root / "models"
    models.mkdir()
    model = models / "tiny.onnx"
    model.write_bytes(tiny.onnx.read_bytes())
    ckpt = models / "tiny.pth"
    ckpt.write_bytes(tiny.ckpt.read_bytes())
    bins = root / "bins"
    bins.mkdir()
    (bins / "img0.bin").write_bytes(np.zeros((3, H, W), np.float32).tobytes())
    info = root / "bins.info"
    info.write_text(f"0 {bins / 'img0.bin'} {W} {H}\n")
    dumps = _dumps(root / "dumps")
    return {
        "infer (dumps into the image folder)": (["infer", "--model", model, "--images", images, "--output", images], images),
        "infer (dumps beside the .bin inputs the .info lists)": (["infer", "--model", model, "--input-info", info, "--output", bins], bins),
        "infer (dumps into a folder holding the model)": (["infer", "--model", model, "--images", images, "--output", root], models),
        "preprocess (tensors into the image folder)": (["preprocess", "--image_src_path", images, "--bin_file_path", images], images),
        "preprocess (tensors into a folder holding the images)": (["preprocess", "--image_src_path", images, "--bin_file_path", root], images),
        "postprocess (results into the dump folder)": (
            ["postprocess", "--bin_data_path", dumps, "--test_annotation", root / "sizes.info", "--det_results_path", dumps],
            dumps,
        ),
        "convert (artifact folder holding its model)": (["convert", "--model", model, "--output", models], models),
        "tune (output folder holding its model)": (
            ["tune", "--model", model, "--images", images, "--annotations", root / "a.json", "--output", models],
            models,
        ),
        "get-info (a list it would list itself)": (["get-info", "jpg", images, images / "list.jpg"], images),
        "export (onto its checkpoint)": (["export", "--checkpoint", ckpt, "--output", ckpt], models),
    }


def test_every_verb_refuses_an_output_overlapping_an_input(tiny, tmp_path, capsys) -> None:
    cases = _overlap_cases(tmp_path, tiny)
    for name, (args, kept) in cases.items():
        before = _snapshot(kept)
        code, out, err = cli(capsys, *args)
        assert_clean(code, out, err, 2, "an output never overlaps an input")
        _one_line(err)
        record(name, str(args[0]), code, err, "refused in one line before anything is written")
        assert _snapshot(kept) == before, name


# --------------------------------------------------------------------------- 2. one writer per output


def _wait_for_holder(lock_file: Path, pid: int, proc: object = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_file.is_file() and lock_file.read_text().split(" ")[0] == str(pid):
            return
        if proc is not None and getattr(proc, "poll", lambda: None)() is not None:
            pytest.fail(f"the first run ended early: {proc.communicate()}")  # type: ignore[attr-defined]
        time.sleep(0.1)
    pytest.fail(f"{lock_file} was not taken by pid {pid}")


def test_a_second_infer_into_a_busy_folder_is_refused_and_a_killed_holder_frees_it(tiny, tmp_path) -> None:
    images = _images(tmp_path / "images")
    out = tmp_path / "dumps"
    infer = [*console_script(), "infer", "--model", str(tiny.onnx), "--images", str(images), "--output", str(out), "--workers", "0"]
    first = subprocess.Popen([*infer, "--loop", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(out / ".fcos-lock", first.pid, first)
        second = subprocess.run(infer, capture_output=True, text=True, timeout=300)
        line = record("a second infer into a folder another infer writes", "infer", second.returncode, second.stderr, "refused in one line")
        assert second.returncode == 1 and f"in use by another infer (pid {first.pid})" in _one_line(second.stderr), second.stderr
        assert "Traceback" not in second.stderr and line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    third = subprocess.run(infer, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == ["img0_1.bin", "img0_2.bin", "img1_1.bin", "img1_2.bin"]
    assert not (out / ".fcos-lock").exists()  # the holder that finished removed its lock file


def _slow_compare(a: str, b: str, output: str) -> None:
    """In a forked child: ``compare`` whose output comparison waits forever (it holds its output's lock meanwhile)."""
    from fcos_offline.compare import run

    def stuck(*args: object, **kwargs: object) -> None:
        time.sleep(3600)

    run.compare_dumps = stuck  # type: ignore[assignment]
    run.compare(run.CompareOptions(a=a, b=b, output=output))


def test_a_second_compare_into_one_output_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys) -> None:
    a, b, out = _dumps(tmp_path / "a"), _dumps(tmp_path / "b"), tmp_path / "cmp"
    holder = multiprocessing.get_context("fork").Process(target=_slow_compare, args=(str(a), str(b), str(out)))
    holder.start()
    try:
        assert holder.pid is not None
        _wait_for_holder(out / ".fcos-lock", holder.pid)
        code, stdout, err = cli(capsys, "compare", a, b, "--output", out)
        record("a second compare into one --output", "compare", code, err, "refused in one line")
        assert_clean(code, stdout, err, 1, f"in use by another compare (pid {holder.pid})")
        _one_line(err)
        assert not (out / "compare.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join()
    code, stdout, err = cli(capsys, "compare", a, b, "--output", out)
    assert code == 0 and json.loads((out / "compare.json").read_text())["within_tolerance"], err


def test_a_lock_is_one_per_folder_and_released_by_a_killed_holder(tmp_path) -> None:
    folder = tmp_path / "out"
    script = f"from fcos_offline.io import OutputLock\nwith OutputLock({str(folder)!r}, 'infer'):\n    print('held', flush=True)\n    input()\n"
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"in use by another infer \\(pid {holder.pid}\\)"):
            with OutputLock(folder, "infer"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(folder, "infer"):  # the kernel dropped the dead holder's lock
        assert (folder / ".fcos-lock").read_text() == f"{os.getpid()} infer"
    assert not (folder / ".fcos-lock").exists()


# --------------------------------------------------------------------------- 3. nothing removed outside the output


def test_a_fresh_infer_never_removes_a_perf_file_outside_its_folder(tmp_path) -> None:
    """An earlier run's summary.json names its perf file; only one inside the dump folder is removed with its dumps."""
    from fcos_offline.engine.infer import STAMP, check_dump_folder

    out = _dumps(tmp_path / "dumps")
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = shared / "perf_vision_batchsize_1_device_0.txt"
    outside.write_text("someone else's numbers\n")
    (out / STAMP).write_text(json.dumps({"key": "old model"}))
    (out / "summary.json").write_text(json.dumps({"perf_file": str(outside)}))
    engine = SimpleNamespace(output_key=lambda: "new model", name="onnxruntime", source=SimpleNamespace(path=tmp_path / "new.onnx"))
    check_dump_folder(out, engine, resume=False)  # type: ignore[arg-type]
    assert outside.read_text() == "someone else's numbers\n"
    assert not list(out.glob("*.bin")) and not (out / "summary.json").exists()

    inside = out / "perf_vision_batchsize_1_device_0.txt"
    inside.write_text("the earlier run's\n")
    _dumps(out)
    (out / STAMP).write_text(json.dumps({"key": "old model"}))
    (out / "summary.json").write_text(json.dumps({"perf_file": str(inside)}))
    check_dump_folder(out, engine, resume=False)  # type: ignore[arg-type]
    assert not inside.exists()

    # the benchmark tool's layout: the perf file beside result/dumpOutput_device0, where infer writes it, is the earlier run's
    default = _dumps(tmp_path / "result" / "dumpOutput_device0")
    beside = default.parent / "perf_vision_batchsize_4_device_0.txt"
    beside.write_text("the earlier run's, at another batch\n")
    (default / STAMP).write_text(json.dumps({"key": "old model"}))
    (default / "summary.json").write_text(json.dumps({"perf_file": str(beside)}))
    check_dump_folder(default, engine, resume=False)  # type: ignore[arg-type]
    assert not beside.exists(), "parse would read the earlier model's numbers"


# --------------------------------------------------------------------------- 4. reuse keyed on content


def test_the_eval_set_digest_follows_the_images_bytes_not_their_size_and_time(tmp_path) -> None:
    """``run`` reuses dumps and ``tune`` its trials by this digest: an image replaced by one of the same size
    and modification time used to keep the old mAP."""
    from fcos_offline.data.dataset import EvalSet, InputItem

    images = _images(tmp_path / "images")
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    items = [InputItem(p.stem, str(p), "image") for p in sorted(images.iterdir())]
    before = EvalSet(images, ann, items, tmp_path / "x.info").digest
    target = Path(items[0].path)
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert EvalSet(images, ann, items, tmp_path / "x.info").digest != before


def test_tune_and_run_hold_their_output_and_run_refuses_a_workdir_holding_an_input(tmp_path, capsys) -> None:
    """A second tune into a --output another tune holds is refused before any work, naming the holder's verb (also
    when it is asked through a link); run's --workdir must not hold its checkpoint (run writes and clears folders in
    it), nor lie inside a model folder (an artifact verifies every file in it)."""
    out = tmp_path / "tuned"
    (tmp_path / "link").symlink_to(tmp_path)
    with OutputLock(out, "tune"):
        code, stdout, err = cli(capsys, "tune", "--output", out)
        record("a second tune into one --output", "tune", code, err, "refused in one line")
        assert_clean(code, stdout, err, 1, "in use by another tune")
        _one_line(err)
        with pytest.raises(Exception, match="in use by another tune"):  # the holder's verb; the same folder through a link
            with OutputLock(tmp_path / "link" / "tuned", "run"):
                pass
    assert not (out / "tune.json").exists()
    ckpt = tmp_path / "models" / "m.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read: refused first")
    code, stdout, err = cli(capsys, "run", "--checkpoint", ckpt, "--coco", tmp_path / "coco", "--workdir", ckpt.parent)
    record("run --workdir holding its checkpoint", "run", code, err, "refused in one line before anything is written")
    assert_clean(code, stdout, err, 2, "an output never overlaps an input")
    _one_line(err)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["m.pth"]


def test_no_output_inside_a_model_folder(tiny, tmp_path, capsys) -> None:
    """An artifact verifies every file in its folder: dumps written inside it would make it unusable, so infer refuses
    an --output there (it was allowed as 'inside an input')."""
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert

    art = tmp_path / "art"
    convert(tiny.onnx, "onnxruntime", art, ConvertRequest(batch_size=1))
    images = _images(tmp_path / "images")
    before = _snapshot(art)
    code, stdout, err = cli(capsys, "infer", "--model", art, "--images", images, "--output", art / "dumpOutput_device0")
    record("infer --output inside its model's artifact folder", "infer", code, err, "refused in one line before anything is written")
    assert_clean(code, stdout, err, 2, "an output never overlaps an input")
    _one_line(err)
    assert _snapshot(art) == before
