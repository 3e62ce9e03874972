"""Reliability: untrusted or foreign model files through inspect, export, infer, convert, run and tune.

Checkpoints (a plain ResNet state dict, a pickle that would run ``touch`` when loaded, a 0-byte
file) are refused by every verb in one line naming the file, exit 1, and the pickled code never
runs. ONNX files: a detector whose input/output names differ from ours (and whose outputs come
in the other order) is accepted — the single input is fed by position, ``dets``/``labels`` are
told apart by type (float rank 3 with last dimension 5 / integer rank 2) — and gives the same
dumps; a graph that is no detector is refused naming the file and its outputs, exit 1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from badinputs import (
    CANVAS,
    annotation_json,
    assert_clean,
    cli,
    code_running_pickle,
    console_script,
    dump_files,
    empty_file,
    good_jpeg,
    image_sizes,
    onnx_foreign,
    onnx_renamed,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    resnet_checkpoint,
    tiny,  # noqa: F401 - session fixture: the tiny model
    tune_outcome,
    write_json,
)

H, W = CANVAS
CKPT_CASES = ["plain ResNet checkpoint", "pickle that runs code when loaded", "0-byte checkpoint"]
CKPT_PROBLEM = {
    "plain ResNet checkpoint": "not a dense-detector checkpoint",
    "pickle that runs code when loaded": "refused",
    "0-byte checkpoint": "empty file (0 bytes)",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("models")
    images = root / "images"
    images.mkdir()
    paths = [good_jpeg(images, f"im{i}.jpg", seed=400 + i) for i in range(2)]
    marker = root / "PWNED"
    return SimpleNamespace(
        root=root,
        images=images,
        marker=marker,
        ann=write_json(root / "instances.json", annotation_json(image_sizes(paths))),
        ckpt={
            "plain ResNet checkpoint": resnet_checkpoint(root),
            "pickle that runs code when loaded": code_running_pickle(root, marker),
            "0-byte checkpoint": empty_file(root, "empty.pth"),
        },
        renamed=onnx_renamed(tiny.onnx, root),
        foreign=onnx_foreign(root),
    )


def _verb_args(verb: str, ckpt: Path, files, out: Path) -> list:
    common = ["--images", files.images, "--annotations", files.ann]
    return {
        "inspect": ["inspect", ckpt],
        "export": ["export", "--checkpoint", ckpt, "--output", out / "m.onnx", "--shape", H, W],
        "infer": ["infer", "--engine", "torch", "--checkpoint", ckpt, "--shape", H, W, "--images", files.images, "--output", out / "d"],
        "run": ["run", "--checkpoint", ckpt, *common, "--shape", H, W, "--engines", "onnxruntime", "--batch-sizes", 1, "--workdir", out / "w"],
        "tune": ["tune", "--model", ckpt, *common, "--shape", H, W, "--output", out / "t", "--engines", "onnxruntime"],
    }[verb]


@pytest.mark.parametrize("verb", ["inspect", "export", "infer", "run", "tune"])
@pytest.mark.parametrize("case", CKPT_CASES)
def test_bad_checkpoints_are_refused_in_one_line(case, verb, files, tmp_path, capsys) -> None:
    ckpt = files.ckpt[case]
    code, out, err = cli(capsys, *_verb_args(verb, ckpt, files, tmp_path))
    assert_clean(code, out, err, 1, ckpt.name)
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and ckpt.name in errors[0] and CKPT_PROBLEM[case] in errors[0], err
    record(
        case,
        verb,
        code,
        err,
        "refused in one line naming the file, nothing run" if "pickle" in case else "refused in one line naming the file",
        "error:",
    )
    assert not files.marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "m.onnx").exists()


def test_code_running_pickle_through_the_console_script(files, tmp_path) -> None:
    ckpt = files.ckpt["pickle that runs code when loaded"]
    proc = subprocess.run([*console_script(), "inspect", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert_clean(proc.returncode, proc.stdout, proc.stderr, 1, ckpt.name, "posix.system")
    assert proc.stderr.strip().count("\n") == 0 and not files.marker.exists()
    # --debug shows the traceback (for bug reports), and still runs nothing
    proc = subprocess.run([*console_script(), "--debug", "inspect", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "BadFileError" in proc.stderr
    assert not files.marker.exists()


# --------------------------------------------------------------------------- ONNX files


@pytest.fixture(scope="module")
def reference_dumps(tiny, files, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """infer with our own export, per engine: what the renamed model must reproduce."""
    from fcos_offline.cli import main

    out = {}
    for engine in ("onnxruntime", "openvino"):
        target = tmp_path_factory.mktemp(f"ref_{engine}")
        assert (
            main(["infer", "--model", str(tiny.onnx), "--engine", engine, "--images", str(files.images), "--output", str(target), "--workers", "0"])
            == 0
        )
        out[engine] = dump_files(target)
    return out


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_onnx_with_other_names_is_read_by_position_and_type(engine, files, reference_dumps, tmp_path, capsys) -> None:
    code, out, err = cli(
        capsys, "infer", "--model", files.renamed, "--engine", engine, "--images", files.images, "--output", tmp_path / "d", "--workers", 0
    )
    assert_clean(code, out, err, 0)
    assert dump_files(tmp_path / "d") == reference_dumps[engine]
    record(
        "ONNX with other input/output names",
        "infer" if engine == "onnxruntime" else "infer --engine openvino",
        code,
        out,
        "accepted: one input fed by position, dets/labels told apart by type; dumps identical to our export's",
        "images inferred",
    )


def test_onnx_with_other_names_converts_and_tunes(files, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "convert", "--model", files.renamed, "--output", tmp_path / "art")
    assert_clean(code, out, err, 0)
    record("ONNX with other input/output names", "convert", code, out, "converted; the artifact runs like the model", "wrote")
    code, out, err = cli(capsys, "infer", "--model", tmp_path / "art", "--images", files.images, "--output", tmp_path / "d")
    assert_clean(code, out, err, 0)
    code, out, err = cli(
        capsys,
        "tune",
        "--model",
        files.renamed,
        "--images",
        files.images,
        "--annotations",
        files.ann,
        "--output",
        tmp_path / "t",
        "--engines",
        "onnxruntime",
        "--calib-methods",
        "minmax",
        "--eval-images",
        2,
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
        "--time-budget",
        1,
    )
    assert code in (0, 3) and "Traceback" not in out + err, err[-3000:]
    record(
        "ONNX with other input/output names",
        "tune",
        code,
        err + out,
        f"tuned: the reference configuration runs it; {tune_outcome(code, out)}",
        "chosen:",
    )


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_foreign_onnx_is_refused_naming_its_outputs(engine, files, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "infer", "--model", files.foreign, "--engine", engine, "--images", files.images, "--output", tmp_path / "d")
    assert_clean(code, out, err, 1, files.foreign.name, "probs")
    line = record(
        "ONNX that is not a detector",
        "infer" if engine == "onnxruntime" else "infer --engine openvino",
        code,
        err,
        "refused in one line naming the file and its outputs",
        "error:",
    )
    assert "not a dense detector" in line
    assert not list((tmp_path / "d").glob("*.bin")) if (tmp_path / "d").exists() else True


def test_foreign_onnx_through_the_console_script_and_tune(files, tmp_path, capsys) -> None:
    proc = subprocess.run(
        [*console_script(), "infer", "--model", str(files.foreign), "--images", str(files.images), "--output", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean(proc.returncode, proc.stdout, proc.stderr, 1, files.foreign.name)
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    code, out, err = cli(
        capsys,
        "tune",
        "--model",
        files.foreign,
        "--images",
        files.images,
        "--annotations",
        files.ann,
        "--output",
        tmp_path / "t",
        "--engines",
        "onnxruntime",
        "--calib-methods",
        "minmax",
        "--eval-images",
        2,
        "--calib-images",
        2,
        "--bench-runs",
        1,
        "--no-fallback",
        "--no-sweep",
    )
    assert code == 1 and "Traceback" not in out + err, err[-3000:]
    line = record(
        "ONNX that is not a detector",
        "tune",
        code,
        err,
        "the reference configuration fails: exit 1, the warning names the file and its outputs",
        "not a dense detector",
    )
    assert files.foreign.name in line


def test_zero_byte_onnx(files, tmp_path, capsys) -> None:
    model = empty_file(tmp_path, "empty.onnx")
    code, out, err = cli(capsys, "infer", "--model", model, "--images", files.images, "--output", tmp_path / "d")
    assert_clean(code, out, err, 1, model.name)
    record("0-byte ONNX", "infer", code, err, "refused in one line naming the file", "error:")
    code, out, err = cli(capsys, "convert", "--model", model, "--output", tmp_path / "art")
    assert_clean(code, out, err, 1, model.name)
    record("0-byte ONNX", "convert", code, err, "refused in one line naming the file", "error:")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_engine_failing_with_an_empty_message_is_still_one_line(engine, files, tmp_path, capsys, monkeypatch) -> None:
    """An engine library may raise with no message at all: the error names the file and the
    exception's type instead of crashing on the empty text (it raised IndexError before)."""
    if engine == "onnxruntime":
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "InferenceSession", _raise_empty)
    else:
        openvino = pytest.importorskip("openvino")
        monkeypatch.setattr(openvino.Core, "read_model", _raise_empty)
    code, out, err = cli(capsys, "infer", "--model", files.renamed, "--engine", engine, "--images", files.images, "--output", tmp_path / "d")
    assert_clean(code, out, err, 1, files.renamed.name)
    assert "(RuntimeError)" in err


def _raise_empty(*args, **kwargs):
    raise RuntimeError("")
