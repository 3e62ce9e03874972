"""What ``artifact.json`` records about the files beside it, and what a failed convert write says.

What we want: every artifact ``convert`` writes records the sha256 of each of its files; opening
it refuses a changed, missing or added file (or a link) in one line naming that file; an ONNX or
OpenVINO artifact written before digests existed still opens (parsing those runs no code); a
write that fails during ``convert`` (a full disk, a library's serialisation error) is one line
naming the output.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from badinputs import record, reliability_log  # noqa: F401 - session fixture writing the reliability table
from conftest import make_fcos

from fcos_offline.engine.artifact import read_artifact
from fcos_offline.engine.backends import resolve_model
from fcos_offline.engine.base import ConvertRequest
from fcos_offline.engine.convert import convert
from fcos_offline.errors import DiskFullError, FcosError
from fcos_offline.io import file_digest

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from fcos_offline.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_onnx(make_fcos(seed=0, num_classes=3, stem=4, planes=(4, 8, 16, 32), fpn=16, stacked_convs=1), path, shape=(64, 96), dynamic_batch=True)
    return path


ENGINES = ["onnxruntime", "openvino"]


def _converted(tiny_onnx: Path, tmp_path: Path, engine: str) -> Path:
    if engine == "openvino":
        pytest.importorskip("openvino")
    folder = tmp_path / engine
    convert(tiny_onnx, engine, folder, ConvertRequest(batch_size=1))
    return folder


@pytest.mark.parametrize("engine", ENGINES)
def test_convert_records_every_file_and_opening_verifies_them(tiny_onnx: Path, tmp_path: Path, engine: str) -> None:
    folder = _converted(tiny_onnx, tmp_path, engine)
    files = sorted(p.name for p in folder.iterdir() if p.name != "artifact.json")
    recorded = read_artifact(folder).files
    assert sorted(recorded) == files and all(recorded[n] == file_digest(folder / n) for n in files)
    model = folder / read_artifact(folder).model_file
    with model.open("ab") as f:  # one byte appended
        f.write(b"\0")
    with pytest.raises(FcosError) as err:
        resolve_model(folder)
    record(
        f"{engine} artifact: its model file changed (a byte appended)", "open (library)", None, str(err.value), "refused in one line naming the file"
    )
    assert str(model) in str(err.value) and "changed" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_added_or_linked_file_is_refused_naming_it(tiny_onnx: Path, tmp_path: Path, engine: str) -> None:
    folder = _converted(tiny_onnx, tmp_path, engine)
    extra = folder / "plugin.so"
    extra.write_bytes(b"\x7fELF")
    with pytest.raises(FcosError) as err:
        resolve_model(folder)
    record(f"{engine} artifact: a file added (plugin.so)", "open (library)", None, str(err.value), "refused in one line naming the file")
    assert str(extra) in str(err.value) and "not part of the artifact" in str(err.value) and "\n" not in str(err.value)
    extra.unlink()
    (folder / "link.onnx").symlink_to(tiny_onnx)
    with pytest.raises(FcosError, match=r"link\.onnx") as err:
        resolve_model(folder)
    record(f"{engine} artifact: a link added", "open (library)", None, str(err.value), "refused in one line naming the file")


@pytest.mark.parametrize("engine", ENGINES)
def test_an_older_artifact_without_digests_still_opens(tiny_onnx: Path, tmp_path: Path, engine: str) -> None:
    """ONNX and OpenVINO IR are data (no code runs when they are parsed): an artifact.json of an older version is read as before."""
    folder = _converted(tiny_onnx, tmp_path, engine)
    doc = json.loads((folder / "artifact.json").read_text())
    doc.pop("files")
    (folder / "artifact.json").write_text(json.dumps(doc))
    (folder / "notes.txt").write_text("older versions did not list files")
    assert resolve_model(folder).artifact.files == {}


def test_a_full_disk_during_convert_is_one_line_naming_the_output(tiny_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    from fcos_offline.engine.backends import onnxruntime

    out = tmp_path / "art"

    def enospc(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnxruntime, "convert", enospc)
    with pytest.raises(DiskFullError) as err:
        convert(tiny_onnx, "onnxruntime", out, ConvertRequest())
    record("disk full while convert writes", "convert (library)", None, str(err.value), "one line naming the output; no partial folder")
    assert str(out) in str(err.value) and not out.exists() and not out.with_name("art.part").exists()


def test_a_library_serialisation_error_on_a_full_disk_names_the_output(tiny_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    """What ONNX Runtime / protobuf raise on a full disk ("iostream error", "Protobuf serialization failed") is translated."""
    import fcos_offline.engine.convert as convert_module
    from fcos_offline.engine.backends import onnxruntime

    out = tmp_path / "art"
    calls = []

    def fails(*_args) -> None:
        calls.append(1)
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Protobuf serialization failed.\nmore detail")

    monkeypatch.setattr(onnxruntime, "convert", fails)
    with pytest.raises(FcosError) as err:  # room on the disk: the library's error, in one line naming the output
        convert(tiny_onnx, "onnxruntime", out, ConvertRequest())
    assert str(out) in str(err.value) and "Protobuf serialization failed" in str(err.value) and "\n" not in str(err.value)
    free = iter([1 << 40, 0])  # room when convert starts, none when the write failed
    monkeypatch.setattr(convert_module, "_free_bytes", lambda _folder: next(free))
    with pytest.raises(DiskFullError) as full:
        convert(tiny_onnx, "onnxruntime", out, ConvertRequest())
    assert str(out) in str(full.value) and "disk full" in str(full.value) and "\n" not in str(full.value)
    monkeypatch.setattr(convert_module, "_free_bytes", lambda _folder: 1000)
    calls.clear()
    with pytest.raises(DiskFullError, match="bytes free"):  # refused before any engine library writes (some abort)
        convert(tiny_onnx, "onnxruntime", out, ConvertRequest())
    assert calls == []
