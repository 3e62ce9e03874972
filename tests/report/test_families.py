"""The whole recipe for RetinaNet and ATSS (mmdet) and torchvision's RetinaNet, on the real COCO sample.

Random weights (calibrated to give plenty of detections): the point is the path, so what is
checked is that every stage runs and agrees with the others — the offline engines reproduce the
online PyTorch detections (``run --compare``), ``tune`` measures the family's own head convs and
chooses a build, ``compare --layers`` names them per FPN level.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_fcos, save_mmdet_ckpt, shared_data_dir, torchvision_retinanet_state_dict

from fcos_offline.cli import main
from fcos_offline.export.metadata import read_metadata
from fcos_offline.model.heads.spec import SPECS
from fcos_offline.tune.inputs import TuneOptions
from fcos_offline.tune.search import tune

SHAPE = ("256", "384")


def _photos() -> torch.Tensor:
    """The sample's photos as the engines see them: random heads are calibrated on these, not on noise
    (noise-calibrated anchor heads saturate on real photos: scores of exactly 1 tie, and ties have no order)."""
    import numpy as np

    from fcos_offline.data.preprocess import preprocess_image, read_image

    photos = sorted((shared_data_dir() / "val2017").glob("*.jpg"))
    return torch.from_numpy(np.stack([preprocess_image(read_image(p), *map(int, SHAPE))[0] for p in photos]))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("families")
    x = _photos()
    retina = make_fcos(seed=11, family="retinanet", style="pytorch", extra_on="input", cls_std=1.0, calib_input=x)
    atss = make_fcos(seed=12, family="atss", style="pytorch", norm="gn", cls_std=1.0, calib_input=x)
    tv = make_fcos(seed=13, family="retinanet", layout="torchvision", num_classes=91, cls_std=1.0, calib_input=x)
    paths = SimpleNamespace(
        root=root,
        retinanet=save_mmdet_ckpt(retina, root / "retinanet.pth", meta={"mmdet_version": "2.28.2"}),
        atss=save_mmdet_ckpt(atss, root / "atss.pth", meta={"mmdet_version": "3.3.0"}),
        tv_retinanet=root / "tv_retinanet.pth",
    )
    torch.save(torchvision_retinanet_state_dict(tv), paths.tv_retinanet)
    return paths


@pytest.mark.parametrize(
    ("name", "family", "engines"),
    [
        ("retinanet", "retinanet", ["onnxruntime", "openvino"]),
        ("atss", "atss", ["onnxruntime", "inductor"]),
        ("tv_retinanet", "retinanet", ["openvino"]),
    ],
)
def test_run_end_to_end(ckpts, tmp_path: Path, capsys, name: str, family: str, engines: list[str]) -> None:
    """export (NMS in the graph) → preprocess → infer → postprocess → mAP, and the offline dumps match PyTorch's."""
    work = tmp_path / "run"
    argv = ["run", "--checkpoint", str(getattr(ckpts, name)), "--coco", str(shared_data_dir()), "--shape", *SHAPE]
    code = main([*argv, "--batch-sizes", "1", "--engines", *engines, "--compare", "--workdir", str(work)])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    report = json.loads((work / "report.json").read_text())
    assert {e["engine"] for e in report["entries"] if e["mode"] == "offline"} == set(engines[:1]) | set(engines)
    for entry in report["entries"]:
        assert 0.0 <= entry["bbox_mAP"] <= 1.0
        assert json.loads((Path(entry["dumps"]) / "summary.json").read_text())["num_inferred"] == 10
    overall = report["compare"]["overall"]
    assert overall["images"] == 10 and overall["detections_a"] > 100  # many detections: the agreement means something
    # as for FCOS (conftest.assert_same_detections): >= 99.9% matched; a near-tie at the 100th slot may swap
    assert overall["match_rate"] >= 0.999 and overall["box_err_px_max"] < 0.01 and overall["score_err_max"] < 1e-5, overall
    assert read_metadata(report["onnx"])["config"]["head"]["family"] == family


def _int8_faster(self, engine, batch_size: int) -> dict:
    """Deterministic timings (a tiny model on a shared machine is not faster in int8): int8 2.5x faster than float,
    each group returned to float costs a little, so every int8 build that misses the check gets its fallback."""
    path = str(engine.source.path)
    ms = 10.0
    if "ort-qdq" in path or "nncf" in path:
        m = re.search(r"\+float(\d+)", path)
        ms = 4.0 + (0.2 * int(m.group(1)) if m else 0.0)
    return {"ms_per_img": ms, "img_per_s": 1000.0 / ms, "runs": 1, "ms_per_batch_min": ms * batch_size}


@pytest.mark.parametrize("name", ["retinanet", "atss"])
def test_tune_measures_the_familys_head_and_chooses_a_build(ckpts, tmp_path: Path, monkeypatch, name: str) -> None:
    """int8 (ONNX Runtime QDQ, NNCF) against the fp32 reference: the sensitivity probe ranks this family's own
    prediction convs, the choice is saved as an artifact, and ``compare --layers`` names the head's maps per level."""
    from fcos_offline.tune.search import Tuner

    monkeypatch.setattr(Tuner, "bench", _int8_faster)
    family = SPECS[name]
    out = tmp_path / "tuned"
    opts = TuneOptions(
        model=str(getattr(ckpts, name)),
        coco=str(shared_data_dir()),
        output=str(out),
        shape=(256, 384),
        eval_images=6,
        calib_images=4,
        holdout_images=0,
        threads=(1,),
        bench_runs=3,
        bench_seconds=0.2,
        warmup=1,
        sensitivity_images=2,
        max_fallback_steps=1,
        sweep=False,
        confirm_top=0,
        # ATSS (per-level Scale kept float by design) through both quantizers; RetinaNet through ONNX Runtime's
        candidates=("onnxruntime/ort-qdq-u8s8-minmax-pc/fp32", "nncf-performance")
        if name == "atss"
        else ("onnxruntime/ort-qdq-u8s8-minmax-pc/fp32",),
    )
    result = tune(opts)
    assert result["chosen"] and (out / "best" / "artifact.json").is_file()
    assert result["accuracy_check"]["criterion"] == "agreement"  # random weights: mAP near zero, judged by output agreement
    order = result["sensitivity"]["order"]
    assert {f"bbox_head.{conv}" for conv in family.convs.values()} <= set(order), order
    assert not any(n.startswith("bbox_head.conv_") for n in order)  # no FCOS names in another family's graph
    fp32 = next(out / t["model"] for t in result["trials"] if t["key"] == result["reference"]["key"])  # paths in tune.json: under --output
    int8 = next(out / t["model"] for t in result["trials"] if "ort-qdq" in t["key"])
    cmp_out = tmp_path / "layers"
    argv = ["compare", str(fp32), str(int8), "--images", str(shared_data_dir() / "val2017"), "--layers", "--num-images", "2", "--layer-images", "1"]
    assert main([*argv, "--output", str(cmp_out)]) in (0, 1)
    labels = {t["label"] for t in json.loads((cmp_out / "compare.json").read_text())["layers"]["tensors"]}
    assert {f"bbox_head.{family.convs['cls']} @P{p}" for p in range(3, 8)} <= labels
