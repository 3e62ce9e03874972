"""The compiled PyTorch engine (``convert --engine inductor``) on the CPU, as CI can run it.

What we want: ``convert`` writes a self-contained artifact (a ``torch.export`` program, its
settings, a filled compile cache) checked against eager PyTorch; ``infer --model FOLDER`` in a
fresh process starts from that cache and reproduces ONNX Runtime's detections on the demo model
(>= 99.9% matched); misuse is one usage line. The demo network is compiled once for the module
(about a minute on two cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_same_detections

from fcos_offline.cli import main
from fcos_offline.data.dumps import read_dumps
from fcos_offline.demo import DEMO_CHECKPOINT
from fcos_offline.demo.synthetic import DEMO_CANVAS, make_demo_data
from fcos_offline.engine.artifact import read_artifact
from fcos_offline.model.checkpoint import load_checkpoint
from fcos_offline.model.config import FCOSConfig

torch = pytest.importorskip("torch")
if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
    pytest.skip("inductor's CPU backend needs a C++ compiler (g++), which this machine lacks", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("inductor")
    art = root / "fcos_cpu"
    argv = ["convert", "--engine", "inductor", "--checkpoint", str(DEMO_CHECKPOINT), "--shape", *map(str, DEMO_CANVAS)]
    assert main([*argv, "--batch-size", "2", "--output", str(art)]) == 0
    data = make_demo_data(root / "demo", "val", 12, seed=7)
    return SimpleNamespace(root=root, art=art, images=Path(data["image_dir"]))


def test_convert_writes_a_self_contained_checked_artifact(built) -> None:
    art = read_artifact(built.art)
    assert art.engine == "inductor" and art.model_file == "model.pt2" and (built.art / "model.pt2").is_file()
    assert art.input_shape == [2, 3, *DEMO_CANVAS] and art.batch_size == 2 and art.precision == "fp32"
    assert art.engine_options is not None and art.engine_options.device == "cpu" and art.engine_options.precision == "fp32"
    assert art.engine_options.threads == torch.get_num_threads()  # what the compiled CPU code is specialised for
    # the post-processing config and layout the program cannot tell, as the checkpoint has them
    assert FCOSConfig.from_dict(art.settings["model"]) == load_checkpoint(DEMO_CHECKPOINT).config
    assert art.settings["channels_last"] is False and art.settings["cuda_graphs"] is False  # the CPU defaults
    assert art.settings["compiled_vs_eager_max_rel_error"] < 1e-4
    assert any(p.is_file() for p in (built.art / "compile-cache").rglob("*")), "convert's compile left no cache"


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
    assert "checkpoint" in _usage_error(capsys, [*convert, "--model", str(built.art / "model.pt2"), "--shape", "64", "64"])
    assert not (tmp_path / "x").exists()
    infer = ["infer", "--images", str(built.images), "--output", str(tmp_path / "o")]
    assert "compiled for fp32" in _usage_error(capsys, [*infer, "--model", str(built.art), "--precision", "bf16"])
    assert "use --engine inductor" in _usage_error(capsys, [*infer, "--model", str(built.art), "--engine", "onnxruntime"])
    assert "not the .pt2 alone" in _usage_error(capsys, [*infer, "--model", str(built.art / "model.pt2")])
