"""``fcos-offline run``: the whole recipe end to end (demo default and real-data mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_fcos, save_mmdet_ckpt, shared_data_dir

from fcos_offline.cli import main
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.io import OutputLock
from fcos_offline.report.run import DEMO_CHECKPOINT, RunOptions, run

ENTRY_KEYS = {
    "mode",
    "engine",
    "precision",
    "execution_precision",
    "batch_size",
    "bbox_mAP",
    "bbox_mAP_50",
    "engine_img_per_s",
    "e2e_img_per_s",
    "engine_ms_per_batch",
    "engine_spread_pct",
}


def _check_report(root: Path, report: dict, n_configs: int) -> None:
    on_disk = json.loads((root / "report.json").read_text())
    assert on_disk["entries"] == json.loads(json.dumps(report["entries"]))
    assert len(on_disk["entries"]) == n_configs
    for e in on_disk["entries"]:
        assert ENTRY_KEYS <= set(e)
        assert 0.0 <= e["bbox_mAP"] <= 1.0 and 0.0 <= e["bbox_mAP_50"] <= 1.0  # fractions, not percent
        lat, summary = e["engine_ms_per_batch"], json.loads((Path(e["dumps"]) / "summary.json").read_text())
        assert lat["p99"] >= lat["p90"] >= lat["median"] > 0
        # each figure is the one its name says: the engine's own rate and latency, and the wall-clock rate
        assert e["engine_img_per_s"] == summary["infer_fps"] and e["e2e_img_per_s"] == summary["throughput_fps"]
        assert lat["median"] == summary["latency_ms"]["infer"]["median"] and lat["count"] == summary["latency_ms"]["infer"]["count"]
        assert e["engine_img_per_s"] >= e["e2e_img_per_s"] > 0  # the engine alone is never slower than the whole pipeline
        assert Path(e["perf_file"]).is_file()
    assert on_disk["versions"]["onnxruntime"] and on_disk["cpu"]
    load = on_disk["machine_load"]
    assert load["cores"] >= 1 and isinstance(load["busy"], bool) and ("busy machine" in load["note"]) == bool(load["busy"] or load["noisy"])
    assert on_disk["units"]["bbox_mAP"].startswith("fraction")
    for png in on_disk["plots"]:
        assert (root / png).stat().st_size > 1000 and (root / png).read_bytes()[:4] == b"\x89PNG"
    md = (root / "report.md").read_text()
    assert "| model | online mAP % (PyTorch) | offline mAP % (engine) | Δ mAP (points) |" in md
    assert "| engine img/s | end-to-end img/s | engine ms/batch p50 | p90 | p99 |" in md
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
    with OutputLock(root, "run"):
        with pytest.raises(FcosError, match="in use by another run"):
            with OutputLock(root, "run"):
                pass
        code = main(["run", "--workdir", str(root), "--num-images", "2"])
        assert code == 1
        assert "in use by another run" in capsys.readouterr().err
    assert not (root / ".fcos-lock").exists()
    # a lock file a killed run left (its pid dead, no process holding the lock) is taken over
    (root / ".fcos-lock").write_text(str(2**22 + 12345))
    with OutputLock(root, "run"):
        assert (root / ".fcos-lock").read_text() == f"{os.getpid()} run"


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


def _bf16_artifact(tmp_path: Path, onnx: str) -> Path:
    """An OpenVINO artifact at 192x320, batch 2, whose artifact.json records bf16 execution (as tune writes one)."""
    from dataclasses import replace

    from fcos_offline.engine.artifact import read_artifact, write_artifact
    from fcos_offline.engine.base import ConvertRequest, EngineOptions
    from fcos_offline.engine.convert import convert

    artifact = tmp_path / "ov_bf16"
    convert(onnx, "openvino", artifact, ConvertRequest(batch_size=2))
    write_artifact(artifact, replace(read_artifact(artifact), engine_options=EngineOptions(precision="bf16"), tuned=True))
    return artifact


def test_run_model_takes_the_artifacts_precision_canvas_and_batch(tmp_path: Path) -> None:
    """run --model on a bf16 OpenVINO artifact at 192x320 with no --shape/--precision/--batch-sizes: it runs bf16 and
    says so, at 192x320 and the artifact's batch, and the checkpoint is exported at 192x320 only (it was exported at
    800x1333, refused the artifact's canvas, and ran fp32 under a 'bf16' label). A flag still overrides."""
    import onnx

    sample = shared_data_dir()
    ckpt = save_mmdet_ckpt(make_fcos(seed=5), tmp_path / "m.pth")
    common = dict(checkpoint=str(ckpt), coco=str(sample), online=False, num_images=4, vis_images=0)
    first = run(RunOptions(**common, shape=(192, 320), batch_sizes=(2,), engines=("onnxruntime",), workdir=str(tmp_path / "a")))
    artifact = _bf16_artifact(tmp_path, first["onnx"])

    report = run(RunOptions(**common, model=str(artifact), workdir=str(tmp_path / "b")))
    (entry,) = report["entries"]
    info = entry["engine_info"]
    assert report["shape"] == [192, 320] and info["input_hw"] == [192, 320] and entry["batch_size"] == 2
    assert info["precision"] == "bf16"  # asked of OpenVINO: the artifact's recorded precision
    assert entry["execution_precision"] == info["execution_precision"] and entry["precision"] == info["execution_precision"]
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert entry["precision"] == "bf16"
    exported = sorted((tmp_path / "b").rglob("*.onnx"))
    assert exported, "the checkpoint is exported for the online side and the export check"
    for f in exported:  # nothing at a canvas the artifact does not use
        dims = onnx.load(str(f), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        assert (dims[2].dim_value, dims[3].dim_value) == (192, 320), f

    forced = run(RunOptions(**common, model=str(artifact), precision="fp32", workdir=str(tmp_path / "c")))
    assert forced["entries"][0]["engine_info"]["precision"] == "fp32" == forced["entries"][0]["execution_precision"]
    with pytest.raises(UsageError, match="takes 192x320 inputs"):
        run(RunOptions(**common, model=str(artifact), shape=(256, 384), workdir=str(tmp_path / "d")))


def test_run_cli_defaults_leave_the_artifact_in_charge(tmp_path: Path, monkeypatch) -> None:
    """The CLI gives no --precision/--device/--batch-sizes of its own (they were fp32, cpu and 1 4, passed on as if given)."""
    import fcos_offline.report.run as run_module

    seen: list[RunOptions] = []
    monkeypatch.setattr(run_module, "run", lambda opts: seen.append(opts) or (_ for _ in ()).throw(FcosError("stop")))
    assert main(["run", "--model", str(tmp_path / "x"), "--workdir", str(tmp_path / "w")]) == 1
    (opts,) = seen
    assert opts.precision is None and opts.device is None and opts.batch_sizes is None and opts.threads is None and opts.shape is None
