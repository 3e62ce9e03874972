"""``fcos-offline infer`` as a process: flat memory when streaming many images, and SIGKILL + ``--resume``.

Both run the installed console script in a subprocess on a tiny random FCOS (128x192 canvas) over
small synthetic JPEGs, so hundreds of images take seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import make_fcos

from fcos_offline.data.dumps import read_dumps

psutil = pytest.importorskip("psutil", reason="psutil (dev extra) measures the process tree's memory")

CANVAS = (128, 192)
MB = 2**20


def _console_script() -> list[str]:
    exe = Path(sys.executable).with_name("fcos-offline")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fcos_offline.cli"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from fcos_offline.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("tiny_model") / "tiny.onnx"
    network = make_fcos(seed=11, calib_shape=CANVAS, stem=4, planes=(4, 8, 16, 32), fpn=16, stacked_convs=1, num_classes=8)
    export_onnx(network, path, CANVAS, dynamic_batch=True, verify=False)
    return path


def write_small_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 64x96 textured JPEGs named im0000.jpg, im0001.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = cv2.resize(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_LINEAR)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"im{i:04d}.jpg"), img)
    return folder


def _tree(proc: psutil.Process) -> list:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_with_peak_rss(cmd: list[str], log: Path, interval: float = 0.01) -> tuple[int, int, int]:
    """Run ``cmd``; return (exit code, peak RSS of the process tree summed, peak RSS of the main process)."""
    with open(log, "wb") as f:
        proc = psutil.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        peak_tree = peak_main = 0
        while proc.poll() is None:
            total = 0
            for p in _tree(proc):
                try:
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if p.pid == proc.pid:
                    peak_main = max(peak_main, rss)
            peak_tree = max(peak_tree, total)
            time.sleep(interval)
    return proc.wait(), peak_tree, peak_main


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_image_count(tiny_onnx, tmp_path) -> None:
    """Peak RSS (main process + preprocessing worker) over 500 images stays that of 50 images."""
    peaks = {}
    for n in (50, 500):
        images = write_small_jpegs(tmp_path / f"images{n}", n, seed=n)
        out = tmp_path / f"out{n}"
        cmd = [
            *_console_script(),
            "infer",
            "--model",
            str(tiny_onnx),
            "--images",
            str(images),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--workers",
            "1",
        ]
        code, tree, main_rss = run_with_peak_rss(cmd, tmp_path / f"log{n}.txt")
        assert code == 0, (tmp_path / f"log{n}.txt").read_text()[-2000:]
        s = json.loads((out / "summary.json").read_text())
        assert s["num_inferred"] == n and len(list(out.glob("*_2.bin"))) == n
        peaks[n] = (tree, main_rss, s["wall_s"])
    print()
    for n, (tree, main_rss, wall) in peaks.items():
        print(f"streaming infer over {n:3d} images: peak RSS {tree / MB:.1f} MB process tree, {main_rss / MB:.1f} MB main process, {wall:.1f} s")
    tree50, main50, _ = peaks[50]
    tree500, main500, _ = peaks[500]
    assert tree500 < tree50 * 1.3 + 30 * MB, peaks
    assert main500 < main50 * 1.3 + 30 * MB, peaks
    # (keeping the 450 extra preprocessed tensors, 3x128x192 float32 = 0.28 MB each, would add 127 MB)


def _kill_tree(proc: psutil.Process) -> None:
    """SIGKILL the infer process and the worker processes it started, each by its pid."""
    family = _tree(proc)
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_dumps(tiny_onnx, tmp_path) -> None:
    n = 300
    images = write_small_jpegs(tmp_path / "images", n, seed=3)
    base = [*_console_script(), "infer", "--model", str(tiny_onnx), "--images", str(images), "--batch-size", "2", "--workers", "1"]

    full = tmp_path / "full"
    assert subprocess.run([*base, "--output", str(full)], capture_output=True, timeout=300).returncode == 0
    expected = {p.name: p.read_bytes() for p in full.glob("*.bin")}
    assert len(expected) == 2 * n

    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = psutil.Popen([*base, "--output", str(out)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and sum(1 for _ in out.glob("*_2.bin")) >= 40:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "infer finished before it could be killed; use more images"
        _kill_tree(proc)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really died mid-run

    # what a kill leaves: whole files only; temporary files (if any) are not dumps
    names = {p.name for p in out.iterdir()}
    dumps = {name for name in names if name.endswith((".bin", ".npy"))}
    # the dumps' key, written before the first dump, and the output lock's file (a kill leaves it unlocked: the next run takes it)
    temporaries = names - dumps - {".fcos-dumps.json", ".fcos-lock"}
    assert all(".part" in name for name in temporaries), temporaries
    for name in dumps:
        size = (out / name).stat().st_size
        assert size == (800 if name.endswith("_1.bin") else 2000), (name, size)
        assert (out / name).read_bytes() == expected[name], name
    complete = {s for s in (name[: -len("_1.bin")] for name in dumps if name.endswith("_1.bin")) if f"{s}_2.bin" in dumps}
    assert 40 <= len(complete) < n
    skipped: list = []
    assert set(read_dumps(out, skipped=skipped)) == complete  # a lone _1.bin is reported, never read as a pair

    done = subprocess.run([*base, "--output", str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_resumed"] == len(complete) and s["num_inferred"] == n - len(complete) and s["num_images"] == n
    resumed = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert resumed == expected
    assert set(read_dumps(out)) == {f"im{i:04d}" for i in range(n)}
    print(f"\nkilled after {len(complete)} of {n} images ({len(temporaries)} temporary files left); --resume inferred the other {s['num_inferred']}")
