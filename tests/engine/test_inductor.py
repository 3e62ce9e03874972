"""The compiled PyTorch engine (``convert --engine inductor``) on the CPU, as CI can run it.

What we want: ``convert`` writes a self-contained artifact (plain weights, its settings and the
digest of every file) checked against eager PyTorch, and fills this user's compile cache (never the
artifact folder); ``infer --model FOLDER`` in a fresh process starts from that cache and reproduces
ONNX Runtime's detections on the demo model (>= 99.9% matched); misuse is one usage line. Opening an
artifact runs no code planted in it (a pickle, a cache module, a shared library, a tampered
``artifact.json``) and a damaged one is one line naming the file. The demo network is compiled once
for the module (about a minute on two cores).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from badinputs import record, reliability_log  # noqa: F401 - session fixture writing the reliability table
from conftest import assert_same_detections

from fcos_offline.cli import main
from fcos_offline.data.dumps import read_dumps
from fcos_offline.demo import DEMO_CHECKPOINT
from fcos_offline.demo.synthetic import DEMO_CANVAS, make_demo_data
from fcos_offline.engine.artifact import read_artifact
from fcos_offline.engine.backends.inductor import CACHE_ENV, MODEL_FILE, user_cache
from fcos_offline.io import file_digest
from fcos_offline.model.checkpoint import load_checkpoint
from fcos_offline.model.config import DetectorConfig

torch = pytest.importorskip("torch")
if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
    pytest.skip("inductor's CPU backend needs a C++ compiler (g++), which this machine lacks", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("inductor")
    cache = root / "user-cache"
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)  # this module's compile cache (fresh processes inherit it)
    art = root / "fcos_cpu"
    argv = ["convert", "--engine", "inductor", "--checkpoint", str(DEMO_CHECKPOINT), "--shape", *map(str, DEMO_CANVAS)]
    assert main([*argv, "--batch-size", "2", "--output", str(art)]) == 0
    data = make_demo_data(root / "demo", "val", 12, seed=7)
    yield SimpleNamespace(root=root, art=art, images=Path(data["image_dir"]), cache=cache)
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


def test_convert_writes_a_self_contained_checked_artifact(built) -> None:
    art = read_artifact(built.art)
    assert art.engine == "inductor" and art.model_file == MODEL_FILE and sorted(p.name for p in built.art.iterdir()) == ["artifact.json", MODEL_FILE]
    assert art.files == {MODEL_FILE: file_digest(built.art / MODEL_FILE)}
    assert art.input_shape == [2, 3, *DEMO_CANVAS] and art.batch_size == 2 and art.precision == "fp32"
    assert art.engine_options is not None and art.engine_options.device == "cpu" and art.engine_options.precision == "fp32"
    assert art.engine_options.threads == torch.get_num_threads()  # what the compiled CPU code is specialised for
    # the post-processing config and layout the program cannot tell, as the checkpoint has them
    assert DetectorConfig.from_dict(art.settings["model"]) == load_checkpoint(DEMO_CHECKPOINT).config
    assert art.settings["channels_last"] is False and art.settings["cuda_graphs"] is False  # the CPU defaults
    assert art.settings["compiled_vs_eager_max_rel_error"] < 1e-4
    # the compile cache is this user's (0700), keyed by the weights' digest, not in the artifact
    cache = user_cache(art.files[MODEL_FILE])
    assert cache.parent.parent == built.cache and (built.cache.stat().st_mode & 0o777) == 0o700
    assert any(p.is_file() for p in cache.rglob("*")), "convert's compile left no cache"


def test_infer_starts_warm_and_reproduces_onnxruntime(built) -> None:
    onnx_path = built.root / "demo.onnx"
    assert main(["export", "--checkpoint", str(DEMO_CHECKPOINT), "--shape", *map(str, DEMO_CANVAS), "--output", str(onnx_path)]) == 0
    ort_out = built.root / "ort"
    assert main(["infer", "--model", str(onnx_path), "--images", str(built.images), "--output", str(ort_out), "--batch-size", "2"]) == 0
    ind_out = built.root / "ind"
    args = ["infer", "--model", str(built.art), "--images", str(built.images), "--output", str(ind_out), "--batch-size", "2"]
    proc = subprocess.run([sys.executable, "-m", "fcos_offline", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    engine = json.loads((ind_out / "summary.json").read_text())["engine"]
    assert engine["engine"] == "inductor" and engine["execution_precision"] == "fp32"
    assert engine["compile_cache_hit"] is True, "a fresh process did not start from the artifact's compile cache"
    assert_same_detections(read_dumps(ort_out), read_dumps(ind_out), "inductor vs onnxruntime")


def _usage_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_misuse_is_one_usage_line(built, tmp_path, capsys) -> None:
    convert = ["convert", "--engine", "inductor", "--output", str(tmp_path / "x")]
    ckpt = ["--checkpoint", str(DEMO_CHECKPOINT)]
    assert "--shape" in _usage_error(capsys, [*convert, *ckpt])
    assert "GPU precision" in _usage_error(capsys, [*convert, *ckpt, "--shape", "64", "64", "--precision", "fp16"])
    assert "checkpoint" in _usage_error(capsys, [*convert, "--model", str(built.art / MODEL_FILE), "--shape", "64", "64"])
    assert not (tmp_path / "x").exists()
    infer = ["infer", "--images", str(built.images), "--output", str(tmp_path / "o")]
    assert "compiled for fp32" in _usage_error(capsys, [*infer, "--model", str(built.art), "--precision", "bf16"])
    assert "use --engine inductor" in _usage_error(capsys, [*infer, "--model", str(built.art), "--engine", "onnxruntime"])
    assert "give its folder" in _usage_error(capsys, [*infer, "--model", str(built.art / MODEL_FILE)])


# --------------------------------------------------------------------------- what opening an artifact trusts


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the artifact ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _copy(built, tmp_path: Path) -> Path:
    folder = tmp_path / "handed_over"
    shutil.copytree(built.art, folder)
    return folder


def _redigest(folder: Path) -> None:
    """What an attacker who edits files also does: record their new digests in artifact.json."""
    doc = json.loads((folder / "artifact.json").read_text())
    doc["files"] = {p.relative_to(folder).as_posix(): file_digest(p) for p in folder.rglob("*") if p.is_file() and p.name != "artifact.json"}
    (folder / "artifact.json").write_text(json.dumps(doc))


def _infer(built, folder: Path, tmp_path: Path) -> int:
    return main(["infer", "--model", str(folder), "--images", str(built.images), "--output", str(tmp_path / "out")])


def _refused(built, capsys, folder: Path, tmp_path: Path, case: str) -> str:
    """``infer --model folder`` fails with exit 1 and one line (no traceback); recorded in the reliability table as ``case``."""
    code = _infer(built, folder, tmp_path)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    record(f"inductor artifact: {case}", "infer", code, err, "refused in one line naming the file; nothing in the artifact runs")
    return lines[0]


@pytest.mark.parametrize("redigest", [False, True], ids=["digest-kept", "digest-rewritten"])
def test_a_pickle_planted_in_the_weights_never_runs(built, tmp_path, capsys, redigest: bool) -> None:
    marker = tmp_path / "PWNED"
    folder = _copy(built, tmp_path)
    torch.save({"weights": _Payload(marker)}, folder / MODEL_FILE)
    if redigest:
        _redigest(folder)
    line = _refused(built, capsys, folder, tmp_path, f"a pickle planted in {MODEL_FILE} ({'digest rewritten' if redigest else 'digest kept'})")
    assert not marker.exists(), "a pickle in the artifact was executed"
    assert str(folder / MODEL_FILE) in line


@pytest.mark.parametrize(
    "planted",
    ["sample_inputs/model.pt", "compile-cache/fxgraph/ab/evil.py", "compile-cache/evil.so", "models/model.json"],
)
def test_code_planted_beside_the_weights_is_refused_naming_it(built, tmp_path, capsys, planted: str) -> None:
    """Files convert did not write (an old layout's sample inputs or compile cache) are refused naming them."""
    marker = tmp_path / "PWNED"
    folder = _copy(built, tmp_path)
    target = folder / planted
    target.parent.mkdir(parents=True)
    if planted.endswith(".py"):
        target.write_text(f"open({str(marker)!r}, 'w')\n")
    elif planted.endswith(".pt"):
        target.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        target.write_bytes(b"\x7fELF" + bytes(64))
    line = _refused(built, capsys, folder, tmp_path, f"{planted} planted beside the weights")
    assert str(target) in line and "not part of the artifact" in line
    assert not marker.exists()


def test_a_compile_cache_in_a_handed_over_folder_is_never_loaded(built, tmp_path) -> None:
    """Even recorded in artifact.json, a planted compile cache is not what infer compiles from: nothing in it runs."""
    marker = tmp_path / "PWNED"
    folder = _copy(built, tmp_path)
    for sub in ("compile-cache/fxgraph/ab", "compile-cache/aotautograd/cd"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    _redigest(folder)
    code = _infer(built, folder, tmp_path)
    record(
        "inductor artifact: a compile cache planted and recorded in artifact.json",
        "infer",
        code,
        "",
        "never loaded (compiled in this user's own cache); nothing in it runs",
    )
    assert code == 0
    assert not marker.exists()


def test_a_tampered_artifact_json_runs_nothing(built, tmp_path, capsys) -> None:
    """artifact.json pointing the model at a planted Python file or pickle, digests and all: still nothing runs."""
    marker = tmp_path / "PWNED"
    folder = _copy(built, tmp_path)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    doc = json.loads((folder / "artifact.json").read_text())
    doc["model_file"] = "evil.py"
    (folder / "artifact.json").write_text(json.dumps(doc))
    _redigest(folder)
    line = _refused(built, capsys, folder, tmp_path, "artifact.json naming a planted .py as the model, digests rewritten")
    assert str(folder / "evil.py") in line and not marker.exists()
    # an artifact.json without digests (an older version's) is refused for inductor: it may hold pickles
    doc.pop("files")
    doc["model_file"] = MODEL_FILE
    (folder / "evil.py").unlink()
    (folder / "artifact.json").write_text(json.dumps(doc))
    line = _refused(built, capsys, folder, tmp_path, "artifact.json without digests (an older version's)")
    assert str(folder / "artifact.json") in line and "convert it again" in line


def test_a_changed_missing_or_added_file_is_one_line_naming_it(built, tmp_path, capsys) -> None:
    folder = _copy(built, tmp_path)
    weights = folder / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert str(weights) in (line := _refused(built, capsys, folder, tmp_path, f"{MODEL_FILE} changed (one byte)")) and "changed" in line
    weights.unlink()
    assert str(weights) in (line := _refused(built, capsys, folder, tmp_path, f"{MODEL_FILE} missing")) and "missing" in line


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("model"), "model"),
        (lambda s: s["model"]["post"].update(iou_thr=-3), "post.iou_thr"),
        (lambda s: s["model"]["post"].update(max_per_img=0), "post.max_per_img"),
        (lambda s: s["model"]["head"].update(strides=[8, 16, 0, 64, 128]), "head.strides"),
        (lambda s: s["model"]["head"].update(strides=[8, 16]), "head.strides"),
        (lambda s: s["model"]["post"].update(bogus=1), "bogus"),
    ],
    ids=["no-model", "iou", "max-per-img", "zero-stride", "stride-count", "unknown-key"],
)
def test_bad_settings_in_artifact_json_are_one_line_naming_it(built, tmp_path, capsys, request, edit, needle: str) -> None:
    folder = _copy(built, tmp_path)
    doc = json.loads((folder / "artifact.json").read_text())
    edit(doc["settings"])
    (folder / "artifact.json").write_text(json.dumps(doc))
    line = _refused(built, capsys, folder, tmp_path, f"artifact.json settings edited: {request.node.callspec.id} ({needle})")
    assert str(folder / "artifact.json") in line and needle in line


def test_a_failing_compile_is_retried_in_an_emptied_cache_then_one_line(tmp_path) -> None:
    """The compile cache is derived data: a compile that fails (a damaged cache, the compiler's pages of
    errors) is retried once from an empty cache, then is one line naming the cache."""
    from fcos_offline.engine.backends.inductor import _first_call
    from fcos_offline.errors import FcosError

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "stale.py").write_text("damaged")
    calls = []

    def fails_once() -> str:
        calls.append(sorted(p.name for p in cache.iterdir()))
        if len(calls) == 1:
            raise RuntimeError("C++ compile error\n" + "g++ says\n" * 39)
        return "compiled"

    assert _first_call(cache, fails_once) == "compiled" and calls == [["stale.py"], []]

    def always_fails() -> str:
        raise RuntimeError("C++ compile error\n" + "g++ says\n" * 39)

    with pytest.raises(FcosError) as err:
        _first_call(cache, always_fails)
    assert str(cache) in str(err.value) and "C++ compile error" in str(err.value) and "\n" not in str(err.value)


def test_a_compile_cache_others_can_write_is_refused(tmp_path, monkeypatch) -> None:
    """Compiled code is loaded from the cache: a cache folder writable by others is not used."""
    from fcos_offline.errors import FcosError

    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(CACHE_ENV, str(shared))
    with pytest.raises(FcosError, match="shared-cache"):
        user_cache("0" * 64)
    shared.chmod(0o700)
    assert (user_cache("0" * 64).stat().st_mode & 0o777) == 0o700


def test_a_cache_folder_that_cannot_be_made_falls_back_to_a_private_temporary_one(tmp_path, monkeypatch, capsys) -> None:
    """A read-only home (service accounts): a cold start in a fresh 0700 folder, said in one line (it refused to open)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    folder = user_cache("ab" * 32)
    try:
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700 and blocker not in folder.parents
        err = capsys.readouterr().err
        assert "cannot use the compile cache" in err and str(folder) in err and CACHE_ENV in err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
