"""Reliability under faults: kill -9, a full disk, two runs on one work folder.

* ``run`` killed with SIGKILL at several points (export, inference, evaluation, report), then run
  again on the same ``--workdir``: the results equal an uninterrupted run's, and no file a later
  step reads is ever torn (``infer``'s kill + ``--resume`` test is in tests/engine/test_stress.py).
* A full disk: a real small tmpfs where this machine lets us mount one (root), and everywhere an
  injected ``ENOSPC`` in the atomic writer. The verb prints one line "disk full while writing X"
  and exits 1; files written before are intact, no partial file is left, and a rerun (``infer
  --resume``, ``run`` on the same work folder) completes with the uninterrupted results.
* Two ``run`` processes on one work folder: the second is refused with a clear line (lock file).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
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
    imread_tensor,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
    write_json,
)

import fcos_offline.io as preprocess_module

H, W = CANVAS
RUN_FLAGS = ["--shape", str(H), str(W), "--batch-sizes", "1", "--engines", "onnxruntime", "--no-online"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    images.mkdir()
    paths = [good_jpeg(images, f"im{i:02d}.jpg", seed=500 + i, h=64 + 4 * (i % 5), w=96) for i in range(12)]
    return SimpleNamespace(root=root, images=images, paths=paths, ann=write_json(root / "instances.json", annotation_json(image_sizes(paths))))


def _run_args(tiny, data, workdir: Path) -> list[str]:
    return [
        "run",
        "--checkpoint",
        str(tiny.ckpt),
        "--images",
        str(data.images),
        "--annotations",
        str(data.ann),
        *RUN_FLAGS,
        "--workdir",
        str(workdir),
    ]


def _results(workdir: Path) -> dict:
    """What a run computed (no timings): dumps, detections, metrics."""
    report = json.loads((workdir / "report.json").read_text())
    entry = report["entries"][0]
    eval_dir = Path(entry["eval"])
    summary = json.loads((eval_dir / "summary.json").read_text())
    return {
        "dumps": dump_files(Path(entry["dumps"])),
        "bbox_results": (eval_dir / "bbox_results.json").read_bytes(),
        "txt": {p.name: p.read_bytes() for p in eval_dir.glob("*.txt")},
        "metrics": {k: summary[k] for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "stats", "classwise")},
        "entry": {k: entry[k] for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "num_images", "skipped")},
    }


@pytest.fixture(scope="module")
def reference(tiny, data, tmp_path_factory) -> dict:
    """An uninterrupted run (console script): the results every faulted run must end with."""
    work = tmp_path_factory.mktemp("reference") / "work"
    proc = subprocess.run([*console_script(), *_run_args(tiny, data, work)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"work": work, **_results(work)}


def assert_no_torn_files(root: Path) -> None:
    """Every file a later step reads is whole: JSON parses, dumps have their size, a stamped model loads."""
    for path in root.rglob("*"):
        if not path.is_file() or ".part" in path.name or path.is_symlink():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name.endswith("_1.bin"):
            assert path.stat().st_size == 800, path
        elif path.name.endswith("_2.bin"):
            assert path.stat().st_size == 2000, path
        elif path.suffix == ".info":
            assert path.read_text().endswith("\n"), path
        elif path.suffix == ".png" and path.parent == root:
            assert path.read_bytes()[-8:-4] == b"IEND", path
    stamp = root / "model" / "export.json"
    if stamp.is_file():
        import onnx

        onnx.checker.check_model(onnx.load(str(root / "model" / "model.onnx")))


# --------------------------------------------------------------------------- kill -9


def _kill_tree(proc) -> None:
    try:
        import psutil

        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)
    except Exception:
        family = []
    for p in family or [proc]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _kill_when(cmd: list[str], ready, delay: float, log: Path, timeout: float = 300) -> bool:
    """Start ``cmd``, SIGKILL it ``delay`` s after ``ready()`` holds; False if it finished first."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        _kill_tree(proc)
    return True


@pytest.mark.slow
def test_run_killed_at_several_points_then_rerun_gives_the_uninterrupted_results(tiny, data, reference, tmp_path) -> None:
    rng = random.Random(20240611)
    work = tmp_path / "work"
    dump_dir = work / "result" / "offline_onnxruntime_bs1" / "dumpOutput_device0"
    stages = {
        "export": lambda: (work / "model").is_dir(),
        "inference": lambda: dump_dir.is_dir() and sum(1 for _ in dump_dir.glob("*_2.bin")) >= 4,
        "evaluation": lambda: (work / "eval").is_dir(),
        "report": lambda: (work / "pr_curves.png").exists(),
    }
    killed = []
    cmd = [*console_script(), *_run_args(tiny, data, work)]
    for stage, ready in stages.items():
        if _kill_when(cmd, ready, rng.uniform(0.0, 0.05), tmp_path / f"{stage}.log"):
            killed.append(stage)
        assert_no_torn_files(work)
    assert len(killed) >= 2, f"the run finished before most kills ({killed}); make it longer"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert_clean(done.returncode, done.stdout, done.stderr, 0)
    assert_no_torn_files(work)
    assert not (work / ".fcos-lock").exists()
    got = _results(work)
    for key in ("dumps", "bbox_results", "txt", "metrics", "entry"):
        assert got[key] == reference[key], key
    record(
        "kill -9 during run (then the same --workdir again)",
        "run",
        done.returncode,
        done.stdout,
        f"killed during {', '.join(killed)}: no torn file; the rerun reuses finished steps and gives the uninterrupted dumps, detections and mAP",
        "report:",
    )


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused(tiny, data, reference, tmp_path) -> None:
    work = tmp_path / "work"
    with open(tmp_path / "first.log", "wb") as log:
        args = _run_args(tiny, data, work)
        i = args.index("--batch-sizes")
        longer = [*args[: i + 2], "2", *args[i + 2 :]]  # batch sizes 1 and 2: the first run holds the lock longer
        first = subprocess.Popen([*console_script(), *longer], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (work / ".fcos-lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert (work / ".fcos-lock").exists(), "the first run never took the lock"
        second = subprocess.run([*console_script(), *_run_args(tiny, data, work)], capture_output=True, text=True, timeout=300)
        still_running = first.poll() is None
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert still_running, "the first run ended before the second asked for the lock; use more images"
    assert_clean(second.returncode, second.stdout, second.stderr, 1, str(work), f"pid {first.pid}")
    line = record(
        "second run on a busy --workdir",
        "run",
        second.returncode,
        second.stderr,
        "refused in one line naming the folder and the running pid (lock file); the first run is unaffected",
        "in use by another run",
    )
    assert [ln for ln in second.stderr.splitlines() if ln.strip()] == [line]
    assert not (work / ".fcos-lock").exists()
    assert _results(work)["metrics"] == reference["metrics"]


# --------------------------------------------------------------------------- full disk: a real tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size (skips where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size: int, remount: Path | None = None) -> Path:
        if remount is not None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(remount)], check=True, capture_output=True)
            return remount
        target = tmp_path / f"reliability-tmpfs-{uuid.uuid4().hex[:8]}"
        target.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests cover the same paths")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected-ENOSPC tests cover it")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _disk_full_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "disk full while writing" in ln]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_preprocess_on_a_full_tmpfs(data, small_disk, tmp_path, capsys) -> None:
    disk = small_disk(1024 * 1024)  # room for three 128x192 tensors (288 KiB each), not four
    code, out, err = cli(
        capsys,
        "preprocess",
        "--image-src-path",
        data.images,
        "--bin-file-path",
        disk,
        "--model-input-height",
        H,
        "--model-input-width",
        W,
        "--workers",
        1,
    )
    assert_clean(code, out, err, 1)
    line = record(
        "full disk (real tmpfs)",
        "preprocess",
        code,
        err,
        "stops: one line naming the file; the .bin files written before are whole; no partial file",
        "disk full",
    )
    assert "disk full while writing" in line and "im03.bin" in line
    written = sorted(p.name for p in disk.iterdir())
    assert written == ["im00.bin", "im01.bin", "im02.bin"]
    for name in written:
        np.testing.assert_array_equal(
            np.fromfile(disk / name, np.float32).reshape(3, H, W), imread_tensor(data.images / name.replace(".bin", ".jpg"))
        )
    # the same with worker processes (the error crosses the process boundary) through the console script
    for p in disk.iterdir():
        p.unlink()
    proc = subprocess.run(
        [
            *console_script(),
            "preprocess",
            "--image-src-path",
            str(data.images),
            "--bin-file-path",
            str(disk),
            "--model-input-height",
            str(H),
            "--model-input-width",
            str(W),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean(proc.returncode, proc.stdout, proc.stderr, 1)
    assert "disk full while writing" in _disk_full_line(proc.stderr)
    # two workers may run out of room together: 2 or 3 whole tensors, never a partial or temporary file
    assert len(list(disk.iterdir())) in (2, 3) and all(p.stat().st_size == 3 * H * W * 4 for p in disk.iterdir())


def test_infer_on_a_full_tmpfs_then_resume(tiny, data, reference, small_disk, capsys) -> None:
    disk = small_disk(11 * 4096)  # a page per dump file: about five images' dumps
    args = ["infer", "--model", tiny.onnx, "--images", data.images, "--output", disk / "dumps", "--workers", 0]
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 1)
    line = record(
        "full disk (real tmpfs)",
        "infer",
        code,
        err,
        "stops: one line naming the file; earlier dumps whole; --resume on a bigger disk completes with the uninterrupted dumps",
        "disk full",
    )
    assert "disk full while writing" in line
    partial = dump_files(disk / "dumps")
    assert partial and all(reference["dumps"][name] == data_ for name, data_ in partial.items())
    assert not [p for p in (disk / "dumps").iterdir() if ".part" in p.name]
    small_disk(4 * 1024 * 1024, remount=disk)
    code, out, err = cli(capsys, *args, "--resume")
    assert_clean(code, out, err, 0)
    assert dump_files(disk / "dumps") == reference["dumps"]


@pytest.mark.slow
def test_run_on_a_full_tmpfs_at_several_points_then_rerun(tiny, data, reference, small_disk, tmp_path, capsys) -> None:
    """Sizes at fractions of a whole run's footprint: the disk fills during export, inference, evaluation, report."""
    probe = small_disk(64 * 1024 * 1024)
    assert cli(capsys, *_run_args(tiny, data, probe / "work"))[0] == 0
    st = os.statvfs(probe)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    where = []
    for fraction in (0.3, 0.75, 0.93, 0.99):
        disk = small_disk(max(64 * 1024, int(used * fraction) // 4096 * 4096))
        work = disk / "work"
        code, out, err = cli(capsys, *_run_args(tiny, data, work))
        if code == 0:
            continue  # this fraction happened to fit: nothing to check
        assert_clean(code, out, err, 1)
        line = _disk_full_line(err)
        where.append(line.split("disk full while writing ")[1].split(" (")[0].replace(str(work) + "/", ""))
        assert not [p for p in work.rglob("*.part*")], "a partial file was left"
        assert_no_torn_files(work)
        small_disk(64 * 1024 * 1024, remount=disk)
        code, out, err = cli(capsys, *_run_args(tiny, data, work))
        assert_clean(code, out, err, 0)
        got = _results(work)
        for key in ("dumps", "bbox_results", "txt", "metrics"):
            assert got[key] == reference[key], (fraction, key)
    assert len(where) >= 3, where
    record(
        "full disk (real tmpfs)",
        "run",
        1,
        line,
        f"stops with one line naming the file (seen: {', '.join(dict.fromkeys(where))}); "
        "no partial file; the same --workdir on a bigger disk completes with the uninterrupted results",
        "disk full",
    )


# --------------------------------------------------------------------------- full disk: injected ENOSPC


class FullDisk:
    """Replaces ``open`` inside the atomic writer: the first ``allow`` files write, then ENOSPC halfway."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.failed: list[str] = []

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        if self.allow > 0:
            self.allow -= 1
            return f
        self.failed.append(str(path))

        class _Filling:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, payload):
                data = bytes(payload)
                f.write(data[: len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return _Filling()


@pytest.fixture
def full_disk(monkeypatch):
    def install(allow: int) -> FullDisk:
        disk = FullDisk(allow)
        monkeypatch.setattr(preprocess_module, "open", disk.open, raising=False)
        return disk

    yield install
    monkeypatch.delattr(preprocess_module, "open", raising=False)


def _parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".part" in p.name]


def test_injected_enospc_preprocess_and_get_info(data, full_disk, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    full_disk(5)
    code, out, err = cli(
        capsys,
        "preprocess",
        "--image-src-path",
        data.images,
        "--bin-file-path",
        bins,
        "--model-input-height",
        H,
        "--model-input-width",
        W,
        "--workers",
        1,
    )
    assert_clean(code, out, err, 1, "im05.bin")
    record(
        "full disk (injected ENOSPC)",
        "preprocess",
        code,
        err,
        "stops: one line naming the file; earlier .bin files whole; no partial file",
        "disk full",
    )
    assert sorted(p.name for p in bins.glob("*.bin")) == [f"im{i:02d}.bin" for i in range(5)] and not _parts(bins)
    assert all(p.stat().st_size == 3 * H * W * 4 for p in bins.glob("*.bin"))
    full_disk(0)
    code, out, err = cli(capsys, "get-info", "jpg", data.images, tmp_path / "fcos_jpeg.info", "--workers", 1)
    assert_clean(code, out, err, 1, "fcos_jpeg.info")
    record("full disk (injected ENOSPC)", "get-info", code, err, "stops: one line naming the file; no partial .info", "disk full")
    assert not (tmp_path / "fcos_jpeg.info").exists() and not _parts(tmp_path)


def test_injected_enospc_infer_then_resume(tiny, data, reference, full_disk, tmp_path, capsys) -> None:
    out_dir = tmp_path / "dumps"
    args = ["infer", "--model", tiny.onnx, "--images", data.images, "--output", out_dir, "--workers", 0]
    disk = full_disk(10)  # the dumps' key, 4 whole pairs and a lone labels file, then the disk is full
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 1, Path(disk.failed[0]).name.split(".part")[0])
    record(
        "full disk (injected ENOSPC)",
        "infer",
        code,
        err,
        "stops: one line naming the file; earlier dumps whole; --resume completes with the uninterrupted dumps",
        "disk full",
    )
    partial = dump_files(out_dir)
    assert len(partial) == 9 and all(reference["dumps"][k] == v for k, v in partial.items()) and not _parts(out_dir)
    assert not (out_dir / "summary.json").exists()
    full_disk(10**6)
    code, out, err = cli(capsys, *args, "--resume")
    assert_clean(code, out, err, 0)
    assert dump_files(out_dir) == reference["dumps"]
    assert json.loads((out_dir / "summary.json").read_text())["num_resumed"] == 4


def test_injected_enospc_postprocess(data, reference, full_disk, tmp_path, capsys) -> None:
    from fcos_offline.data.info import make_info

    info = make_info("jpg", data.images, tmp_path / "fcos_jpeg.info", workers=1).out_path
    dumps = Path(json.loads((reference["work"] / "report.json").read_text())["entries"][0]["dumps"])
    out_dir = tmp_path / "pp"
    args = [
        "postprocess",
        "--bin-data-path",
        dumps,
        "--test-annotation",
        info,
        "--det-results-path",
        out_dir,
        "--annotations-path",
        data.ann,
        "--net-input-height",
        H,
        "--net-input-width",
        W,
    ]
    full_disk(3)
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 1, "im03.txt")
    record(
        "full disk (injected ENOSPC)", "postprocess", code, err, "stops: one line naming the file; earlier files whole; no partial file", "disk full"
    )
    assert sorted(p.name for p in out_dir.iterdir()) == ["im00.txt", "im01.txt", "im02.txt"]
    assert all((out_dir / n).read_bytes() == reference["txt"][n] for n in ("im00.txt", "im01.txt", "im02.txt"))
    full_disk(10**6)
    code, out, err = cli(capsys, *args)
    assert_clean(code, out, err, 0)
    assert (out_dir / "bbox_results.json").read_bytes() == reference["bbox_results"]


def test_injected_enospc_run_then_same_workdir(tiny, data, reference, full_disk, tmp_path, capsys) -> None:
    work = tmp_path / "work"
    disk = full_disk(8)  # .info, export stamp, three dump pairs: the disk fills during inference
    code, out, err = cli(capsys, *_run_args(tiny, data, work))
    assert_clean(code, out, err, 1, Path(disk.failed[0]).name.split(".part")[0])
    record(
        "full disk (injected ENOSPC)",
        "run",
        code,
        err,
        "stops: one line naming the file; no partial file; the same --workdir completes with the uninterrupted results",
        "disk full",
    )
    assert not _parts(work) and not (work / ".fcos-lock").exists()
    assert_no_torn_files(work)
    full_disk(10**6)
    code, out, err = cli(capsys, *_run_args(tiny, data, work))
    assert_clean(code, out, err, 0)
    got = _results(work)
    for key in ("dumps", "bbox_results", "txt", "metrics"):
        assert got[key] == reference[key], key
