"""The feed: worker processes decode and letterbox into shared memory, the parent builds the batch.

What we want: the shared-memory feed gives the same pixels and byte-identical dumps as reading in
process; no image array is pickled; a run killed mid-way leaves no shared memory behind and
``--resume`` completes it to the same bytes; and the float conversion done by an engine on its
device (:class:`DeviceFeed`) is bit-identical to the host path.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import dump_bytes, make_fcos, write_images

from fcos_offline.cli import main
from fcos_offline.data.dataset import InputItem
from fcos_offline.data.preprocess import preprocess_image, read_image, to_input_tensor
from fcos_offline.engine.base import EngineConfig
from fcos_offline.engine.infer import SHM_PREFIX, Feed, _read_into_slot, default_workers, items_from_images, read_input

CANVAS = (128, 192)
SIZES = [(480, 640), (640, 480), (57, 83), (300, 300), (200, 1024), (1024, 200), (128, 192), (720, 1280)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    from fcos_offline.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("feed")
    onnx_path = root / "m.onnx"
    export_onnx(make_fcos(seed=3, calib_shape=CANVAS), onnx_path, CANVAS, dynamic_batch=True, verify=False)
    images = write_images(root / "images", SIZES * 6, seed=4)  # 48 images, same stem pattern as the infer tests
    return SimpleNamespace(root=root, onnx=onnx_path, images=images)


def _shm_segments(pid: int) -> set[str]:
    """The feed blocks process ``pid`` made (named by their maker, so parallel test workers do not mix)."""
    prefix = f"{SHM_PREFIX}{pid}-"
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)} if Path("/dev/shm").is_dir() else set()


def test_shared_memory_feed_gives_the_in_process_pixels(setup) -> None:
    items = items_from_images(setup.images)[:10]
    feed = Feed(items, CANVAS, workers=2, window=4)
    assert feed.shm is not None and feed.pool is not None  # the worker path is what is tested
    assert _shm_segments(os.getpid()) == {feed.shm.name.lstrip("/")}  # the block the helper watches
    got = list(feed)
    assert [g.item.stem for g in got] == [i.stem for i in items]  # in order
    for loaded in got:
        ref = read_input(loaded.item, CANVAS)
        assert loaded.problem is None and loaded.pads == ref.pads
        assert loaded.pixels is not None and ref.pixels is not None
        assert loaded.pixels.dtype == np.uint8 and np.array_equal(loaded.pixels, ref.pixels)
        expected, _ = preprocess_image(read_image(loaded.item.path), *CANVAS)
        assert np.array_equal(loaded.tensor(CANVAS), expected)
    assert not _shm_segments(os.getpid())  # the block is unlinked when the feed ends


def test_only_shapes_cross_the_process_boundary(tmp_path) -> None:
    """A worker's reply for an 800x1333 photo is a few hundred bytes: the pixels went through shared memory."""
    from multiprocessing.shared_memory import SharedMemory

    path = write_images(tmp_path / "big", [(800, 1333)])
    item = items_from_images(path)[0]
    canvas = (800, 1333)
    shm = SharedMemory(create=True, size=3 * canvas[0] * canvas[1] * 4)
    try:
        reply = _read_into_slot(item, canvas, shm.name, 0)
        loaded, shape, dtype = reply
        assert len(pickle.dumps(reply)) < 4096
        view = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
        assert np.array_equal(view, read_input(item, canvas).pixels)
        del view
    finally:
        shm.close()
        shm.unlink()


def test_bin_inputs_travel_through_shared_memory_too(setup, tmp_path) -> None:
    bins = []
    for i, item in enumerate(items_from_images(setup.images)[:3]):
        tensor, _ = preprocess_image(read_image(item.path), *CANVAS)
        path = tmp_path / f"t{i}.bin"
        tensor.tofile(path)
        bins.append(InputItem(f"t{i}", str(path), "bin"))
    got = list(Feed(bins, CANVAS, workers=1, window=2))
    for loaded, item in zip(got, bins):
        assert loaded.pads is None and np.array_equal(loaded.tensor(CANVAS), np.fromfile(item.path, "<f4").reshape(3, *CANVAS))


def test_worker_feed_and_in_process_feed_give_identical_dumps(setup, tmp_path) -> None:
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        args = ["infer", "--model", str(setup.onnx), "--images", str(setup.images), "--output", str(out), "--batch-size", "3"]
        assert main([*args, "--workers", str(workers)]) == 0
        outs[workers] = dump_bytes(out)
    assert len(outs[0]) == 2 * len(SIZES) * 6
    assert outs[2] == outs[0]


def test_killed_run_leaves_no_shared_memory_and_resume_is_exact(setup, tmp_path) -> None:
    reference = tmp_path / "clean"
    assert main(["infer", "--model", str(setup.onnx), "--images", str(setup.images), "--output", str(reference), "--workers", "0"]) == 0
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fcos_offline", "infer", "--model", str(setup.onnx), "--images", str(setup.images)]
    args += ["--output", str(out), "--workers", "1", "--loop", "4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*_2.bin"))) < 5:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert _shm_segments(proc.pid), "the run's feed block is not where the check looks"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*_2.bin")))
    assert 0 < done < len(SIZES) * 6
    deadline = time.time() + 30  # the resource tracker removes the dead run's block
    while time.time() < deadline and _shm_segments(proc.pid):
        time.sleep(0.2)
    assert not _shm_segments(proc.pid), "a killed run left shared memory behind"
    assert main(["infer", "--model", str(setup.onnx), "--images", str(setup.images), "--output", str(out), "--resume"]) == 0
    assert dump_bytes(out) == dump_bytes(reference)


def test_blocks_of_runs_killed_with_their_process_group_are_removed_by_the_next(setup, tmp_path) -> None:
    """No resource tracker survives ``kill -9`` of a whole process group: the next feed removes what it left."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = Path("/dev/shm") / f"{SHM_PREFIX}{gone.stdout.strip()}-deadbeef"
    alive = Path("/dev/shm") / f"{SHM_PREFIX}{os.getpid()}-cafebabe"  # a running process's block stays
    try:
        stale.write_bytes(b"\0" * 4096)
        alive.write_bytes(b"\0" * 4096)
        list(Feed(items_from_images(setup.images)[:2], CANVAS, workers=1, window=2))
        assert not stale.exists() and alive.exists()
        assert _shm_segments(os.getpid()) == {alive.name}  # the feed removed its own block too
    finally:
        stale.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the device batch


def test_device_feed_is_bit_identical_to_the_host_conversion() -> None:
    """DeviceFeed's arithmetic (run here with torch on the CPU; the GPU tests run it on CUDA)."""
    pytest.importorskip("torch")
    from fcos_offline.data.preprocess import letterbox_uint8
    from fcos_offline.engine.torch_runtime import DeviceFeed

    rng = np.random.default_rng(0)
    canvas = (96, 160)
    feed = DeviceFeed("cpu", canvas)
    for sizes in ([(50, 70), (96, 160), (300, 90)], [(10, 400)], [(120, 120), (20, 30)]):
        images, pads, expected = [], [], []
        for h, w in sizes:
            resized, lb = letterbox_uint8(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), *canvas)
            images.append(resized)
            pads.append((lb.pad_top, lb.pad_left))
            expected.append(to_input_tensor(resized, lb.pad_top, lb.pad_left, *canvas))
        got = feed.batch(images, pads).numpy()
        assert got.dtype == np.float32 and got.tobytes() == np.stack(expected).tobytes()


def test_torch_engine_letterboxed_path_equals_the_float_path(tmp_path) -> None:
    pytest.importorskip("torch")
    from conftest import save_mmdet_ckpt

    from fcos_offline.data.preprocess import letterbox_uint8
    from fcos_offline.engine.backends import EngineOptions, open_engine

    ckpt = save_mmdet_ckpt(make_fcos(seed=3, calib_shape=CANVAS), tmp_path / "m.pth")
    rng = np.random.default_rng(1)
    images, pads = [], []
    for h, w in [(100, 150), (300, 200)]:
        resized, lb = letterbox_uint8(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), *CANVAS)
        images.append(resized)
        pads.append((lb.pad_top, lb.pad_left))
    with open_engine(ckpt, EngineOptions(engine="torch"), CANVAS) as engine:
        assert not engine.device_input  # on the CPU the feed builds floats on the host
        floats = engine.run(np.stack([to_input_tensor(i, *p, *CANVAS) for i, p in zip(images, pads)]))
        device = engine.run_letterboxed(images, pads)
    assert floats[0].tobytes() == device[0].tobytes() and floats[1].tobytes() == device[1].tobytes()


@pytest.mark.parametrize(
    ("cores", "device_input", "threads", "inter_op", "expected"),
    [
        (2, False, None, None, 0),  # a CPU engine on every core decodes in its own process
        (2, False, 2, None, 0),
        (2, False, 1, 2, 0),  # 1 intra-op + 2 inter-op threads fill both cores
        (2, False, 1, None, 1),  # a free core gets a worker
        (16, False, 4, None, 4),  # at most 4 beside a CPU engine
        (2, True, None, None, 1),  # an engine on a device leaves the cores to the feed
        (16, True, None, None, 8),
        (1, True, None, None, 0),
    ],
)
def test_default_workers_leave_a_cpu_engine_its_cores(monkeypatch, cores, device_input, threads, inter_op, expected) -> None:
    import fcos_offline.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_count", lambda: cores)
    engine = SimpleNamespace(device_input=device_input, config=EngineConfig(threads=threads, inter_op_threads=inter_op))
    photos = [InputItem(f"img{i}", f"/x/img{i}.jpg", "image") for i in range(10)]
    assert default_workers(engine, photos) == expected  # type: ignore[arg-type]
    assert default_workers(engine, photos[:2]) == 0  # a few inputs: no process start-up
    tensors = [InputItem(f"t{i}", f"/x/t{i}.bin", "bin") for i in range(10)]
    assert default_workers(engine, tensors) == 0  # .bin tensors: nothing to decode


def test_images_read_from_a_url_get_the_local_guards() -> None:
    """A decode task reading an fsspec URL refuses what a local read refuses: a header declaring a
    billion pixels (before decoding), a truncated JPEG, an empty file; a good photo letterboxes."""
    import struct
    import zlib

    fsspec = pytest.importorskip("fsspec", reason="fsspec comes with the [ray] extra")
    from badinputs import jpeg_bytes

    from fcos_offline.engine.distributed import _load_row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32000, 32000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    good = jpeg_bytes(72, 96)
    files = {"huge.png": huge, "cut.jpg": good[: len(good) // 2], "empty.jpg": b"", "good.jpg": good}
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        fs.pipe(f"/fcos-test/{name}", data)
    problems = {name: _load_row({"stem": name, "path": f"memory://fcos-test/{name}", "kind": "image"}, (64, 96))["problem"] for name in files}
    assert "declares 32000x32000 pixels" in problems["huge.png"]
    assert "truncated" in problems["cut.jpg"]
    assert "empty file" in problems["empty.jpg"]
    assert problems["good.jpg"] == ""
