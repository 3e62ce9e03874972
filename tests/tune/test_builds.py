"""tune's model builds under ``<output>/models`` are reused only for the same source model, calibration images,
canvas and settings: a second tune into one folder with another model used to reuse every build of the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcos_offline.tune import quantize as q
from fcos_offline.tune.builds import ModelBuilder
from fcos_offline.tune.space import ORT_QDQ_DEFAULT, Candidate

CANVAS = (64, 96)


@pytest.fixture
def fake_ort(monkeypatch) -> list[bytes]:
    """ORT's pre-processing and quantize_static replaced by byte copies; returns the sources quantized, in order."""
    quantized: list[bytes] = []

    def preprocess(src: Path, dst: Path) -> Path:
        dst = Path(dst)
        if not dst.is_file():  # like the real one: an existing file is taken as done
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(src).read_bytes())
        return dst

    def quantize(src: Path, dst: Path, images: object, config: object, nodes: object = (), cache_dir: object = None) -> Path:
        quantized.append(Path(src).read_bytes())
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        Path(dst).write_bytes(b"int8 of " + Path(src).read_bytes())
        return Path(dst)

    monkeypatch.setattr(q, "preprocess_for_ort", preprocess)
    monkeypatch.setattr(q, "ort_quantize", quantize)
    return quantized


def test_a_build_is_reused_only_for_the_same_source_calibration_and_canvas(fake_ort, tmp_path) -> None:
    out, model = tmp_path / "tuned", tmp_path / "fcos.onnx"
    calib = [tmp_path / f"c{i}.jpg" for i in range(3)]
    for i, p in enumerate(calib):
        p.write_bytes(bytes([i]) * 100)
    cand = Candidate("onnxruntime", f"ort-qdq:{ORT_QDQ_DEFAULT}")

    def build(canvas: tuple[int, int] = CANVAS) -> bytes:
        return ModelBuilder(model, out, [str(p) for p in calib], canvas).model_file(cand).read_bytes()

    model.write_bytes(b"model A")
    assert build() == b"int8 of model A" and len(fake_ort) == 1
    assert build() == b"int8 of model A" and len(fake_ort) == 1  # same source and settings: reused
    model.write_bytes(b"model B")  # another model at the same path (a re-export)
    assert build() == b"int8 of model B" and fake_ort[-1] == b"model B"
    other = tmp_path / "other.onnx"
    other.write_bytes(b"model C")
    assert ModelBuilder(other, out, [str(p) for p in calib], CANVAS).model_file(cand).read_bytes() == b"int8 of model C"
    model.write_bytes(b"model B")
    calib[0].write_bytes(b"another picture".ljust(100))  # other calibration images: other ranges
    assert build() == b"int8 of model B" and len(fake_ort) == 4
    assert build((96, 64)) == b"int8 of model B" and len(fake_ort) == 5  # another canvas
    assert build((96, 64)) == b"int8 of model B" and len(fake_ort) == 5
