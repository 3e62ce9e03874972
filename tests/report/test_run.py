"""``fcos-offline run``: the whole recipe end to end (demo default and real-data mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_fcos, save_mmdet_ckpt, shared_data_dir

from fcos_offline.cli import main
from fcos_offline.errors import FcosError
from fcos_offline.report.run import DEMO_CHECKPOINT, RunOptions, WorkdirLock, run

ENTRY_KEYS = {"mode", "engine", "precision", "batch_size", "bbox_mAP", "bbox_mAP_50", "fps", "latency_ms_p50", "latency_ms_p99"}


def _check_report(root: Path, report: dict, n_configs: int) -> None:
    on_disk = json.loads((root / "report.json").read_text())
    assert on_disk["entries"] == json.loads(json.dumps(report["entries"]))
    assert len(on_disk["entries"]) == n_configs
    for e in on_disk["entries"]:
        assert ENTRY_KEYS <= set(e)
        assert 0.0 <= e["bbox_mAP"] <= 1.0 and 0.0 <= e["bbox_mAP_50"] <= 1.0  # fractions, not percent
        assert e["fps"] > 0 and e["latency_ms_p99"] >= e["latency_ms_p50"] > 0
        assert Path(e["perf_file"]).is_file()
    assert on_disk["versions"]["onnxruntime"] and on_disk["cpu"]
    for png in on_disk["plots"]:
        assert (root / png).stat().st_size > 1000 and (root / png).read_bytes()[:4] == b"\x89PNG"
    md = (root / "report.md").read_text()
    assert "| model | online mAP (PyTorch) | offline mAP (engine) |" in md
    assert md.count("\n| onnxruntime") + md.count("\n| openvino") == len([e for e in on_disk["entries"] if e["mode"] == "offline"])


@pytest.mark.slow
def test_demo_run_end_to_end(tmp_path: Path) -> None:
    """The README's main job on a reduced image count: demo data + shipped model, both engines, bs 1 and 4."""
    assert DEMO_CHECKPOINT.is_file() and DEMO_CHECKPOINT.stat().st_size <= 10 * 2**20
    root = tmp_path / "run"
    code = main(["run", "--workdir", str(root), "--num-images", "16"])
    assert code == 0
    report = json.loads((root / "report.json").read_text())
    _check_report(root, report, n_configs=6)
    online = {e["batch_size"]: e["bbox_mAP"] for e in report["entries"] if e["mode"] == "online"}
    for e in report["entries"]:
        if e["mode"] == "offline":  # fp32 engines reproduce the online mAP
            assert e["precision"] == "fp32"
            assert abs(e["bbox_mAP"] - online[e["batch_size"]]) <= 0.001, e
            assert e["bbox_mAP"] >= 0.5, e
    assert report["detections"] and (root / report["detections"][0]).is_file()


def test_real_data_mode_on_coco_sample(tmp_path: Path) -> None:
    """Real COCO photos + a random-weight 80-class mmdet checkpoint: every stage runs, the report is complete."""
    sample = shared_data_dir()
    ckpt = save_mmdet_ckpt(make_fcos(seed=3), tmp_path / "random80.pth")
    root = tmp_path / "work"
    opts = RunOptions(
        checkpoint=str(ckpt), coco=str(sample), shape=(256, 384), batch_sizes=(1, 4), engines=("onnxruntime", "openvino"), workdir=str(root)
    )
    report = run(opts)
    _check_report(root, report, n_configs=6)
    assert report["num_images"] == 10
    assert report["export"]["verify"]["match_rate"] >= 0.999
    for e in report["entries"]:
        assert e["num_images"] == 10 and not e["skipped"]
        assert len(list(Path(e["dumps"]).glob("*_2.bin"))) == 10
    # the same workdir again: the export is reused and every dump resumed
    again = run(opts)
    assert all(e["resumed"] == 10 for e in again["entries"])
    assert [e["bbox_mAP"] for e in again["entries"]] == [e["bbox_mAP"] for e in report["entries"]]


def test_write_bins_matches_streaming(tmp_path: Path) -> None:
    """--write-bins reproduces the recipe's .bin/.info files and gives the same dumps as streaming."""
    sample = shared_data_dir()
    ckpt = save_mmdet_ckpt(make_fcos(seed=4), tmp_path / "m.pth")
    common = dict(checkpoint=str(ckpt), coco=str(sample), shape=(192, 320), batch_sizes=(2,), engines=("onnxruntime",), online=False, num_images=4)
    a = run(RunOptions(**common, workdir=str(tmp_path / "stream")))
    b = run(RunOptions(**common, workdir=str(tmp_path / "bins"), write_bins=True))
    bins = sorted((tmp_path / "bins" / "val2017_bin").glob("*.bin"))
    assert len(bins) == 4 and all(p.stat().st_size == 3 * 192 * 320 * 4 for p in bins)
    lines = (tmp_path / "bins" / "lists" / "fcos.info").read_text().splitlines()
    assert len(lines) == 4 and lines[0].split()[2:] == ["320", "192"]
    for fa, fb in zip(sorted(Path(a["entries"][0]["dumps"]).glob("*.bin")), sorted(Path(b["entries"][0]["dumps"]).glob("*.bin"))):
        assert fa.name == fb.name and fa.read_bytes() == fb.read_bytes()


def test_workdir_lock_refuses_a_second_run(tmp_path: Path, capsys) -> None:
    root = tmp_path / "busy"
    root.mkdir()
    with WorkdirLock(root):
        with pytest.raises(FcosError, match="in use by another run"):
            with WorkdirLock(root):
                pass
        code = main(["run", "--workdir", str(root), "--num-images", "2"])
        assert code == 1
        assert "in use by another run" in capsys.readouterr().err
    assert not (root / ".lock").exists()
    # a stale lock (dead pid) is taken over
    (root / ".lock").write_text(str(2**22 + 12345))
    with WorkdirLock(root):
        assert (root / ".lock").read_text() == str(os.getpid())


def test_usage_errors(capsys) -> None:
    assert main(["run", "--coco", "/nonexistent"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["run", "--batch-sizes", "0", "--num-images", "1"]) == 2


def test_run_takes_a_converted_artifact(tmp_path: Path) -> None:
    """--model: the offline engines run a 'convert'/'tune' artifact; its engine comes from artifact.json."""
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert

    sample = shared_data_dir()
    ckpt = save_mmdet_ckpt(make_fcos(seed=5), tmp_path / "m.pth")
    common = dict(checkpoint=str(ckpt), coco=str(sample), shape=(192, 320), batch_sizes=(2,), online=False, num_images=4)
    first = run(RunOptions(**common, engines=("onnxruntime",), workdir=str(tmp_path / "a")))
    artifact = tmp_path / "ov_bs2"
    convert(first["onnx"], "openvino", artifact, ConvertRequest(batch_size=2))
    second = run(RunOptions(**common, model=str(artifact), workdir=str(tmp_path / "b")))
    (entry,) = second["entries"]
    assert entry["engine"] == "openvino" and second["offline_model"] == str(artifact)
    assert entry["engine_info"]["model"].endswith("model.xml")
    assert abs(entry["bbox_mAP"] - first["entries"][0]["bbox_mAP"]) <= 0.001


def test_run_refuses_model_settings_with_an_artifact(tmp_path: Path) -> None:
    """--model X --score-thr 0.5: the online side would use 0.5 and X its built-in threshold; refused up front."""
    from fcos_offline.errors import UsageError
    from fcos_offline.model.checkpoint import ModelOverrides

    with pytest.raises(UsageError, match="--score-thr with --model"):
        run(RunOptions(model=str(tmp_path / "art"), overrides=ModelOverrides(score_thr=0.5), workdir=str(tmp_path / "w")))
    assert not (tmp_path / "w").exists()


def test_a_class_count_the_annotations_lack_is_refused_before_inference(tmp_path: Path, capsys) -> None:
    """The 6-class demo model on COCO photos (the sample's annotations list 23 categories): refused
    once the model's labels are known, before any engine runs (it failed after the first inference)."""
    sample = shared_data_dir()
    root = tmp_path / "w"
    code = main(["run", "--checkpoint", str(DEMO_CHECKPOINT), "--coco", str(sample), "--shape", "128", "192", "--workdir", str(root)])
    err = capsys.readouterr().err
    assert code == 1 and "the model has 6 classes but the annotation file lists 23 categories" in err
    assert not (root / "result").exists()
