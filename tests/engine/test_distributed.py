"""``infer --ray`` / ``run --ray`` on a local two-node Ray cluster started by the test.

The distributed run must give the local streaming run's dumps byte for byte, survive a worker
killed mid-run and a driver killed mid-run (rerun with ``--resume``), and name bad images (exit 3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

from fcos_offline.cli import main  # noqa: E402

NUM_IMAGES = 40


def _console() -> list[str]:
    exe = Path(sys.executable).with_name("fcos-offline")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fcos_offline"]


def _dumps(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and one worker node, one CPU each, as separate processes on this machine."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """The demo model (ONNX), 40 demo images, and the local streaming run's dumps (the reference)."""
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import DEMO_CANVAS, make_demo_data
    from fcos_offline.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("ray")
    onnx_path = root / "demo.onnx"
    export_checkpoint(DEMO_CHECKPOINT, onnx_path, DEMO_CANVAS, dynamic_batch=True)
    make_demo_data(root / "d", "val", NUM_IMAGES, seed=1000)
    images = root / "d" / "val2017"
    local = root / "local"
    assert main(["infer", "--model", str(onnx_path), "--images", str(images), "--output", str(local), "--batch-size", "4"]) == 0
    return SimpleNamespace(root=root, onnx=onnx_path, images=images, ann=root / "d" / "annotations", local=local)


def _ray_args(data, cluster, out: Path, *extra: str) -> list[str]:
    return [
        "infer",
        "--model",
        str(data.onnx),
        "--images",
        str(data.images),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--ray",
        cluster.address,
        "--ray-actors",
        "2",
        "--ray-cpus-per-actor",
        "0.5",
        *extra,
    ]


def test_ray_dumps_are_the_local_runs_byte_for_byte(data, cluster, tmp_path, capsys) -> None:
    out = tmp_path / "ray"
    capsys.readouterr()
    assert main(_ray_args(data, cluster, out)) == 0
    first = capsys.readouterr().err.strip().splitlines()[0]  # the cluster joined, named first
    assert first.startswith(f"Ray: joined the running cluster at {cluster.address}: 2 node(s), 2 CPU"), first
    assert _dumps(out) == _dumps(data.local) and len(_dumps(out)) == 2 * NUM_IMAGES
    summary = json.loads((out / "summary.json").read_text())
    dist = summary["distributed"]
    assert dist["nodes"] == 2 and dist["actors"] == 2 and summary["num_inferred"] == NUM_IMAGES
    assert dist["cluster_address"] == cluster.address and dist["cluster"] == "joined"
    assert dist["cluster_resources"]["CPU"] == 2 and [n["CPU"] for n in dist["cluster_nodes"]] == [1, 1]
    assert sum(a["images"] for a in dist["per_actor"].values()) == NUM_IMAGES
    assert all(a["latency_ms"]["p99"] > 0 for a in dist["per_actor"].values())
    assert (out / "perf_vision_batchsize_4_device_0.txt").is_file()
    # and the same mAP through postprocess
    from fcos_offline.data.info import make_info
    from fcos_offline.evaluate.postprocess import postprocess

    make_info("jpg", data.images, tmp_path / "jpg.info", workers=1)
    maps = [postprocess(d, tmp_path / "jpg.info", tmp_path / f"e{i}", data.ann)["bbox_mAP"] for i, d in enumerate((data.local, out))]
    assert maps[0] == maps[1] > 0.3


def test_relative_paths_are_the_drivers_not_the_workers(data, cluster, tmp_path, monkeypatch) -> None:
    """Ray's workers run in their own directory: relative --model, --images and --output name the
    driver's files, and the dumps land where the summary says."""
    shutil.copy(data.onnx, tmp_path / "demo.onnx")
    shutil.copytree(data.images, tmp_path / "val2017")
    (tmp_path / "val2017" / "broken.jpg").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    args = _ray_args(SimpleNamespace(onnx="demo.onnx", images="val2017"), cluster, Path("rel") / "dumps")
    assert main(args) == 3  # the broken image skipped
    assert _dumps(tmp_path / "rel" / "dumps") == _dumps(data.local)
    summary = json.loads((tmp_path / "rel" / "dumps" / "summary.json").read_text())
    assert summary["num_inferred"] == NUM_IMAGES
    assert [s["path"] for s in summary["skipped"]] == [str(Path("val2017") / "broken.jpg")]  # as given, like a local run's


def test_file_urls_for_inputs_and_outputs(data, cluster, tmp_path) -> None:
    out = tmp_path / "url"
    args = [
        "infer",
        "--model",
        str(data.onnx),
        "--images",
        data.images.as_uri(),
        "--output",
        out.as_uri(),
        "--batch-size",
        "4",
        "--ray",
        cluster.address,
        "--ray-cpus-per-actor",
        "0.5",
    ]
    assert main(args) == 0
    assert _dumps(out) == _dumps(data.local)


def _worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("_EngineActor" in part for part in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def test_a_killed_worker_is_retried_and_the_dumps_are_complete(data, cluster, tmp_path) -> None:
    out = tmp_path / "killed_worker"
    proc = subprocess.Popen([*_console(), *_ray_args(data, cluster, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed = None
    while time.time() < deadline and proc.poll() is None and killed is None:
        pids = _worker_pids()
        if pids and len(list(out.glob("*_2.bin"))) >= 4:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, stderr[-3000:]
    assert _dumps(out) == _dumps(data.local)


def test_a_killed_driver_then_resume_completes_identically(data, cluster, tmp_path) -> None:
    out = tmp_path / "killed_driver"
    proc = subprocess.Popen([*_console(), *_ray_args(data, cluster, out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*_2.bin"))) < 8:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before the driver could be killed"
    proc.kill()
    proc.wait(timeout=30)
    done = len(list(out.glob("*_2.bin")))
    assert 8 <= done < NUM_IMAGES and not (out / "summary.json").exists()
    assert main(_ray_args(data, cluster, out, "--resume")) == 0
    assert _dumps(out) == _dumps(data.local)
    assert json.loads((out / "summary.json").read_text())["num_resumed"] >= 8


def test_bad_images_are_named_and_skipped(data, cluster, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(data.images, images)
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    out = tmp_path / "bad"
    args = _ray_args(data, cluster, out)
    args[args.index("--images") + 1] = str(images)
    capsys.readouterr()
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "empty.jpg" in err and "text.jpg" in err and "Traceback" not in err
    skipped = {Path(s["path"]).name for s in json.loads((out / "summary.json").read_text())["skipped"]}
    assert skipped == {"empty.jpg", "text.jpg"}
    assert _dumps(out) == _dumps(data.local)


def test_bins_listed_at_another_size_are_skipped_on_ray_too(data, cluster, tmp_path, capsys) -> None:
    """The workers see paths only: the driver judges a bin-mode .info's listed sizes, as the local run does."""
    from fcos_offline.data.preprocess import preprocess_folder
    from fcos_offline.demo.synthetic import DEMO_CANVAS

    h, w = DEMO_CANVAS
    bins = tmp_path / "bins"
    preprocess_folder(data.images, bins, h, w, workers=1)
    names = sorted(p.name for p in bins.glob("*.bin"))
    lines = [f"{i} {bins / n} {w} {h}" for i, n in enumerate(names)]
    lines[0] = f"0 {bins / names[0]} {h} {w}"  # H and W swapped: same byte count
    (tmp_path / "fcos.info").write_text("\n".join(lines) + "\n")
    args = _ray_args(data, cluster, tmp_path / "out")
    i = args.index("--images")
    args[i : i + 2] = ["--input-info", str(tmp_path / "fcos.info")]
    capsys.readouterr()
    assert main(args) == 3
    assert f"listed as {h}x{w}" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    assert [Path(s["path"]).name for s in skipped] == [names[0]]


def test_without_the_extra_a_one_line_hint(data, tmp_path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from fcos_offline.cli import main\n"
        f"sys.exit(main(['infer', '--model', {str(data.onnx)!r}, '--images', {str(data.images)!r}, '--output', "
        f"{str(tmp_path / 'o')!r}, '--ray']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "fcos-offline[ray]" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_run_on_ray_gives_the_local_reports_numbers(cluster, tmp_path) -> None:
    from fcos_offline.report.run import RunOptions, run

    common = dict(num_images=8, batch_sizes=(2,), engines=("onnxruntime",), online=False, vis_images=0)
    local = run(RunOptions(workdir=str(tmp_path / "local"), **common))  # type: ignore[arg-type]
    distributed = run(RunOptions(workdir=str(tmp_path / "ray"), ray=cluster.address, ray_cpus_per_actor=0.5, **common))  # type: ignore[arg-type]
    assert distributed["entries"][0]["bbox_mAP"] == local["entries"][0]["bbox_mAP"] > 0.3
    assert _dumps(Path(distributed["entries"][0]["dumps"])) == _dumps(Path(local["entries"][0]["dumps"]))
    assert distributed["entries"][0]["engine_info"]["engine"] == "onnxruntime"


# --------------------------------------------------------------------------- what cannot run is said, never waited on


@pytest.mark.parametrize(
    ("nodes", "actors", "cpus", "gpus", "said"),
    [
        ([{"CPU": 2.0}], 16, 1.0, 0.0, ["--ray-actors 16", "16 CPU", "1 node(s) with 2 CPU", "at most 1"]),
        ([{"CPU": 2.0}], 1, 64.0, 0.0, ["64 CPU", "no node has that", "largest node: 2 CPU"]),
        ([{"CPU": 2.0}], 1, 1.0, 1.0, ["1 GPU", "no node has that", "0 GPU"]),
        ([{"CPU": 2.0}], 2, 1.0, 0.0, ["--ray-actors 2", "decode tasks", "at most 1"]),  # both cores taken: nothing decodes
        ([{"CPU": 1.0}, {"CPU": 1.0}], 4, 0.5, 0.0, ["--ray-actors 4", "2 node(s) with 2 CPU", "at most 3"]),
        ([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}], 4, 1.0, 1.0, ["4 GPU", "3 GPU in all", "at most 3"]),
    ],
)
def test_a_pool_the_cluster_cannot_hold_is_refused(nodes, actors, cpus, gpus, said) -> None:
    from fcos_offline.engine.distributed import check_resources
    from fcos_offline.errors import UsageError

    with pytest.raises(UsageError) as caught:
        check_resources(nodes, actors, cpus, gpus)
    assert all(s in str(caught.value) for s in said), str(caught.value)


@pytest.mark.parametrize(
    ("nodes", "actors", "cpus", "gpus"),
    [
        ([{"CPU": 1.0}, {"CPU": 1.0}], 2, 0.5, 0.0),  # the tests' cluster: room left for the decode tasks
        ([{"CPU": 1.0}, {"CPU": 1.0}], 1, 1.0, 0.0),  # the actor on one node, the decode tasks on the other
        ([{"CPU": 2.0}], 1, 1.0, 0.0),  # `--ray` alone on this machine
        ([{"CPU": 16.0, "GPU": 4.0}], 4, 1.0, 1.0),
        ([{"CPU": 16.0, "GPU": 1.0}], 4, 1.0, 0.25),
    ],
)
def test_a_pool_the_cluster_can_hold_passes(nodes, actors, cpus, gpus) -> None:
    from fcos_offline.engine.distributed import check_resources

    check_resources(nodes, actors, cpus, gpus)


def test_an_impossible_pool_is_refused_in_one_line_naming_the_cluster(data, cluster, tmp_path, capsys) -> None:
    out = tmp_path / "too_many"
    capsys.readouterr()
    assert main(_ray_args(data, cluster, out, "--ray-actors", "16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"Ray: joined the running cluster at {cluster.address}"), err
    assert len(err) == 2 and "--ray-actors 16" in err[1] and "2 node(s) with 2 CPU" in err[1], err
    assert not _dumps(out)


def test_actors_that_cannot_start_end_the_run_in_one_line(data, cluster, tmp_path, capsys, monkeypatch) -> None:
    """Another job holds most of the cluster: the pool fits the cluster but cannot start; the run ends after
    the start timeout (here 5 s) instead of waiting for ever."""
    from ray.util.placement_group import placement_group, remove_placement_group

    monkeypatch.setenv("FCOS_RAY_START_TIMEOUT_S", "5")
    if not ray.is_initialized():
        ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
    held = placement_group([{"CPU": 1.0}, {"CPU": 0.5}], strategy="SPREAD")  # 1.5 of the 2 CPUs
    assert held.wait(timeout_seconds=60)
    try:
        capsys.readouterr()
        code = main(_ray_args(data, cluster, tmp_path / "stalled"))  # 2 actors x 0.5 CPU: only 0.5 CPU is free
    finally:
        remove_placement_group(held)
    err = capsys.readouterr().err
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert "did not start within 5 s" in last and "FCOS_RAY_START_TIMEOUT_S" in last and "Traceback" not in err, err


def test_a_worker_error_is_the_local_runs_line(data, cluster, tmp_path, capsys) -> None:
    """A dump the workers cannot write (a folder where the file goes) fails the run with the line a local run gives."""
    first = sorted(data.local.glob("*_2.bin"))[0].name
    lines = {}
    for where, extra in (("local", []), ("ray", ["--ray", cluster.address, "--ray-cpus-per-actor", "0.5"])):
        out = tmp_path / where
        (out / first).mkdir(parents=True)
        capsys.readouterr()
        args = ["infer", "--model", str(data.onnx), "--images", str(data.images), "--output", str(out), "--batch-size", "4", *extra]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "\x1b[" not in err, err
        lines[where] = err.strip().splitlines()[-1].replace(str(out), "OUT")
    assert lines["ray"] == lines["local"] and first in lines["local"], lines


def test_worker_errors_are_unwrapped_to_the_local_runs_error() -> None:
    """Ray's task error around a worker's disk-full / OSError / FcosError gives that error itself; anything
    else one line without ANSI codes or traceback."""
    from ray.exceptions import GetTimeoutError, RayTaskError, UserCodeException

    from fcos_offline.engine.distributed import worker_error
    from fcos_offline.errors import DiskFullError, FcosError

    trace = "\x1b[36mray::MapWorker(_EngineActor).submit()\x1b[39m (pid=1, ip=10.0.0.1)\nTraceback (most recent call last):\n  File x\n"
    full = DiskFullError("/out/a_2.bin", "No space left on device")
    wrapped = RayTaskError("submit", trace + "fcos_offline.errors.DiskFullError: disk full", full)
    try:
        raise UserCodeException("UDF failed") from wrapped
    except UserCodeException as exc:
        assert worker_error(exc, "stalled") is full
    os_error = FileNotFoundError(2, "No such file or directory", "/model.onnx")
    assert worker_error(RayTaskError("f", trace, os_error).as_instanceof_cause(), "stalled") is os_error
    opaque = RayTaskError("f", trace + "    raise ValueError\n\x1b[31mValueError: bad \x1b[0mvalue\n", KeyError("x"))
    made = worker_error(opaque, "stalled")
    assert isinstance(made, FcosError) and str(made) == "a Ray worker failed: ValueError: bad value"
    assert str(worker_error(GetTimeoutError("Timed out while starting actors."), "stalled")) == "stalled"
    note = "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo change retry attempts, ..."  # Ray Data's
    noted = FcosError(f"cannot write /out/a_2.bin: Is a directory\n{note}")
    assert str(worker_error(RayTaskError("f", trace, noted), "stalled")) == "cannot write /out/a_2.bin: Is a directory"
    got = worker_error(RayTaskError("f", trace, PermissionError(13, "Permission denied", note)), "stalled")
    assert isinstance(got, PermissionError) and got.strerror == "Permission denied" and got.filename is None


def test_an_address_where_no_cluster_answers_is_one_line(data, tmp_path) -> None:
    """ray.init retried such an address for minutes without a word."""
    args = ["infer", "--model", str(data.onnx), "--images", str(data.images), "--output", str(tmp_path / "o"), "--ray", "127.0.0.1:1"]
    proc = subprocess.run([*_console(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cannot reach the Ray cluster at" in proc.stderr and "--ray 127.0.0.1:1" in proc.stderr and "Connection refused" in proc.stderr


def test_a_cluster_ray_cannot_join_is_one_line(monkeypatch) -> None:
    """ray.init's own failure (another user's cluster: its session folder unreadable) was a 73-line traceback."""
    from fcos_offline.engine import distributed
    from fcos_offline.errors import FcosError

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/tmp/ray/session_latest/sockets/plasma_store")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(distributed, "_cluster_to_join", lambda address: (True, None))
    with pytest.raises(FcosError) as caught:
        distributed._init_ray("10.0.0.5:6379")
    assert str(caught.value) == (
        "cannot use the Ray cluster at 10.0.0.5:6379: [Errno 13] Permission denied: '/tmp/ray/session_latest/sockets/plasma_store'"
    )
