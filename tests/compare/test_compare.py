"""``fcos-offline compare``: same model vs itself, a perturbed copy found at the right layer, int8 vs fp32 with
tune's sensitivity signal, dump folders in two namings, checkpoint vs ONNX, and ``run --compare``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fcos_offline.cli import main
from fcos_offline.demo import DEMO_CHECKPOINT

CANVAS = (320, 512)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> SimpleNamespace:
    """The shipped demo model exported to ONNX, 8 validation images with annotations, 8 calibration images."""
    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("compare")
    onnx_path = root / "demo.onnx"
    export_checkpoint(DEMO_CHECKPOINT, onnx_path, CANVAS, dynamic_batch=True)
    make_demo_data(root / "val", "val", 8, seed=1000)
    make_demo_data(root / "calib", "train", 8, seed=0)
    return SimpleNamespace(
        root=root, onnx=onnx_path, images=root / "val" / "val2017", ann=root / "val" / "annotations", calib=root / "calib" / "train2017"
    )


def _compare(tmp_path: Path, a: object, b: object, *extra: object) -> tuple[int, dict]:
    out = tmp_path / "cmp"
    code = main(["compare", str(a), str(b), "--output", str(out), *map(str, extra)])
    return code, json.loads((out / "compare.json").read_text())


def test_a_model_against_itself_matches_everything(demo, tmp_path, capsys) -> None:
    code, c = _compare(tmp_path, demo.onnx, demo.onnx, "--images", demo.images, "--annotations", demo.ann, "--layers")
    o = c["overall"]
    assert code == 0 and c["within_tolerance"]
    assert o["matched"] == o["detections_a"] == o["detections_b"] > 100 and o["only_a"] == o["only_b"] == 0
    assert o["score_err_max"] == 0.0 and o["box_err_px_max"] == 0.0
    assert c["delta_mAP"] == 0.0 and c["a"]["mAP"]["bbox_mAP"] > 0.3  # a real detector: mAP as a fraction
    tensors = c["layers"]["tensors"]
    assert len(tensors) > 30 and c["layers"]["first_divergence"] is None and c["layers"]["not_compared"] == []
    assert all(t["max_abs"] == 0.0 and t["cosine"] == pytest.approx(1.0) for t in tensors)
    labels = [t["label"] for t in tensors]
    assert labels.index("backbone.conv1") < labels.index("neck.fpn_convs.0.conv @P3") < labels.index("bbox_head.conv_cls @P3")
    assert {f"bbox_head.conv_cls @P{p}" for p in range(3, 8)} <= set(labels)  # head maps per level
    out = capsys.readouterr().out
    assert "within tolerance" in out and "not compared" not in out


def test_convolutions_the_other_graph_fused_away_are_counted_not_hidden(demo, tmp_path, capsys) -> None:
    """ONNX Runtime's optimised graph (a convert artifact) folds many convolutions into others: --layers
    compares the rest and says how many of A's convolutions it could not compare."""
    import onnx

    art = tmp_path / "art"
    assert main(["convert", "--model", str(demo.onnx), "--engine", "onnxruntime", "--output", str(art)]) == 0
    capsys.readouterr()
    code, c = _compare(tmp_path, demo.onnx, art, "--images", demo.images, "--layers", "--num-images", 2, "--layer-images", 1)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(demo.onnx), load_external_data=False).graph.node)
    missing, compared = c["layers"]["not_compared"], c["layers"]["tensors"]
    assert missing and compared and len(missing) + len(compared) == convs
    assert f"not compared: {len(missing)} of the network's {convs} convolutions" in capsys.readouterr().out


def test_layers_compares_an_optimised_graph_given_as_a_like_given_as_b(demo, tmp_path, capsys) -> None:
    """The optimised artifact as A and its source as B used to be "not the same network"; either order compares
    the same convolutions and counts the same ones as fused away."""
    art = tmp_path / "art"
    assert main(["convert", "--model", str(demo.onnx), "--engine", "onnxruntime", "--output", str(art)]) == 0
    runs = {}
    for name, (a, b) in {"source first": (demo.onnx, art), "artifact first": (art, demo.onnx)}.items():
        capsys.readouterr()
        code, c = _compare(tmp_path / name, a, b, "--images", demo.images, "--layers", "--num-images", 1, "--layer-images", 1)
        assert "not the same network" not in capsys.readouterr().err
        runs[name] = c["layers"]
    forward, backward = runs["source first"], runs["artifact first"]
    assert [t["label"] for t in backward["tensors"]] == [t["label"] for t in forward["tensors"]] != []
    assert backward["not_compared"] == forward["not_compared"] != []


def _perturbed_copy(src: Path, dst: Path, node: str, factor: float = 1.5) -> None:
    """``src`` with one conv node's weights scaled (a private copy of the shared head weight for that level only)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.name == node)
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    scaled = numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name=init.name + "_perturbed")
    model.graph.initializer.append(scaled)
    conv.input[1] = scaled.name
    onnx.save(model, str(dst))


def test_a_perturbed_head_conv_at_p4_is_named_as_the_first_divergence(demo, tmp_path, capsys) -> None:
    node = "/network/bbox_head/cls_convs.1/conv_1/Conv"  # the second cls conv, on level P4 only
    perturbed = tmp_path / "perturbed.onnx"
    _perturbed_copy(demo.onnx, perturbed, node)
    code, c = _compare(tmp_path, demo.onnx, perturbed, "--images", demo.images, "--layers", "--num-images", 4)
    first = c["layers"]["first_divergence"]
    assert code == 1 and not c["within_tolerance"]
    assert first["tensor"] == node + "_output_0" and first["label"] == "bbox_head.cls_convs.1.conv @P4"
    before = [t for t in c["layers"]["tensors"][: [t["tensor"] for t in c["layers"]["tensors"]].index(first["tensor"])]]
    assert before and all(t["within"] and t["max_abs"] == 0.0 for t in before)  # everything before it is identical
    others = [t for t in c["layers"]["tensors"] if "@P3" in t["label"] or "@P5" in t["label"]]
    assert others and all(t["max_abs"] == 0.0 for t in others)  # the other levels are untouched
    out = capsys.readouterr().out
    assert "first divergence: bbox_head.cls_convs.1.conv @P4" in out and "NOT within tolerance" in out


def test_report_html_puts_the_differing_images_side_by_side(demo, tmp_path) -> None:
    """Boxes of one FPN level (P3's box branch scaled) move while the other levels' stay: the page's side-by-side
    pictures flag exactly the detections without a partner within tolerance, and keep the others."""
    perturbed = tmp_path / "perturbed.onnx"
    _perturbed_copy(demo.onnx, perturbed, "/network/bbox_head/conv_reg/Conv", factor=1.3)
    code, c = _compare(tmp_path, demo.onnx, perturbed, "--images", demo.images, "--num-images", 6)
    assert code == 1 and c["overall"]["only_a"] > 0
    page = (tmp_path / "cmp" / "report.html").read_text()
    marker = "<script type='application/json' id='data'>"
    start = page.index(marker) + len(marker)
    data = json.loads(page[start : page.index("</script>", start)])
    pairs = data["pairs"]["images"]
    assert pairs and all(im["src"].startswith("data:image/jpeg;base64,") for im in pairs)
    flagged = sum(d["differs"] for im in pairs for side in ("a", "b") for d in im[side])
    kept = sum(not d["differs"] for im in pairs for side in ("a", "b") for d in im[side])
    assert flagged > 0 and kept > 0  # some detections moved, the other levels' did not


def test_int8_against_fp32_reports_tunes_sensitivity_signal(demo, tmp_path, capsys) -> None:
    """An int8 model against its fp32 source: compare's per-group signal is tune's own, on the same images, and its
    order is the order tune's fallback returns groups to float in."""
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.tune import quantize as q
    from fcos_offline.tune.sensitivity import fallback_order, output_sensitivity
    from fcos_offline.tune.space import ORT_QDQ_DEFAULT, ort_config

    calib = [str(p) for p in list_images(demo.calib)]
    images = q.ImageTensors(calib, CANVAS)
    pre = q.preprocess_for_ort(demo.onnx, tmp_path / "pre.onnx")
    int8 = tmp_path / "int8" / "model.onnx"
    q.ort_quantize(pre, int8, images, ort_config(ORT_QDQ_DEFAULT), cache_dir=tmp_path / "cal")
    groups = q.conv_groups(pre)
    tune_scores = {g: v["score"] for g, v in output_sensitivity(pre, int8, images, groups, 4).items()}
    tune_order = [g.name for g in fallback_order(groups, tune_scores)]

    code, c = _compare(tmp_path, pre, int8, "--images", demo.calib, "--layers", "--layer-images", 4, "--num-images", 8)
    assert code == 1  # int8 differs from fp32
    sens = c["quantization_sensitivity"]
    assert sens["scores"] == pytest.approx(tune_scores)
    assert sens["order"][:8] == tune_order[:8]
    assert c["layers"]["first_divergence"] is not None and c["overall"]["match_rate"] > 0.5
    assert "most quantization-sensitive conv groups" in capsys.readouterr().out


def test_two_dump_folders_in_the_two_namings_give_the_models_report(demo, tmp_path) -> None:
    from fcos_offline.data.info import make_info

    a_dir = tmp_path / "a"
    assert main(["infer", "--model", str(demo.onnx), "--images", str(demo.images), "--output", str(a_dir), "--workers", "0"]) == 0
    ais = tmp_path / "ais"  # the same dumps in ais_bench's 0-based naming (labels _0, dets _1)
    ais.mkdir()
    for p in a_dir.glob("*_1.bin"):
        shutil.copy(p, ais / p.name.replace("_1.bin", "_0.bin"))
    for p in a_dir.glob("*_2.bin"):
        shutil.copy(p, ais / p.name.replace("_2.bin", "_1.bin"))
    info = tmp_path / "jpg.info"
    make_info("jpg", demo.images, info, workers=1)
    code, dumps_report = _compare(tmp_path / "d", a_dir, ais, "--annotations", demo.ann, "--info", info)
    code_models, models_report = _compare(tmp_path / "m", demo.onnx, demo.onnx, "--images", demo.images, "--annotations", demo.ann)
    assert code == code_models == 0
    keys = ("images", "detections_a", "detections_b", "matched", "only_a", "only_b", "score_err_max", "box_err_px_max")
    assert {k: dumps_report["overall"][k] for k in keys} == {k: models_report["overall"][k] for k in keys}
    assert dumps_report["a"]["mAP"] == models_report["a"]["mAP"] == dumps_report["b"]["mAP"]


def test_checkpoint_against_onnx_and_pictures(demo, tmp_path) -> None:
    code, c = _compare(tmp_path, DEMO_CHECKPOINT, demo.onnx, "--images", demo.images, "--num-images", 4, "--draw", 2)
    o = c["overall"]
    assert code == 0 and o["match_rate"] == 1.0 and o["score_err_max"] < 1e-4
    assert c["a"]["kind"] == "checkpoint" and c["a"]["canvas"] == list(CANVAS)  # the canvas came from the ONNX side
    assert len(c["pictures"]) == 2 and all(Path(p).is_file() for p in c["pictures"])


def test_usage_errors(demo, tmp_path, capsys) -> None:
    assert main(["compare", str(demo.onnx), str(demo.onnx), "--output", str(tmp_path / "x")]) == 2  # models need --images
    assert main(["compare", str(demo.onnx), str(tmp_path / "nothing"), "--images", str(demo.images)]) == 1
    err = capsys.readouterr().err
    assert "--images" in err and "nothing" in err and "Traceback" not in err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(DEMO_CHECKPOINT.read_bytes()[:5000])
    out = tmp_path / "y"
    assert main(["compare", str(demo.onnx), str(broken), "--images", str(demo.images), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.pth" in err and "Traceback" not in err and not (out / "a").exists()  # named before A ran


def test_layers_checks_both_graphs_before_running_anything(demo, tmp_path, capsys) -> None:
    """--layers reads ONNX graphs fed the same batch: an OpenVINO artifact or two different fixed
    batches are refused before either side runs; one fixed batch is what both graphs get."""
    arts = {}
    for name, engine, batch in (("ov", "openvino", 1), ("b2", "onnxruntime", 2), ("b3", "onnxruntime", 3)):
        arts[name] = tmp_path / name
        assert main(["convert", "--model", str(demo.onnx), "--engine", engine, "--batch-size", str(batch), "--output", str(arts[name])]) == 0
    capsys.readouterr()
    for a, b, says in (
        (demo.onnx, arts["ov"], "not an artifact without model.onnx (OpenVINO, inductor)"),
        (arts["b2"], arts["b3"], "fixed batches [2, 3]"),
    ):
        out = tmp_path / "refused"
        assert main(["compare", str(a), str(b), "--images", str(demo.images), "--layers", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and not (out / "a").exists()  # nothing ran
    code, doc = _compare(tmp_path, demo.onnx, arts["b2"], "--images", demo.images, "--num-images", 3, "--layers", "--layer-images", 3)
    assert code in (0, 1) and len(doc["layers"]["tensors"]) > 10  # B's fixed batch 2 fed to both graphs


@pytest.mark.slow
def test_run_compare_writes_a_report_section(tmp_path) -> None:
    from fcos_offline.report.run import RunOptions, run

    report = run(RunOptions(workdir=str(tmp_path / "w"), num_images=4, batch_sizes=(2,), engines=("onnxruntime",), compare=True, vis_images=0))
    c = json.loads((tmp_path / "w" / "compare" / "compare.json").read_text())
    assert c["within_tolerance"] and c["overall"]["matched"] > 0 and report["compare"]["overall"] == c["overall"]
    assert "## compare: offline vs online" in (tmp_path / "w" / "report.md").read_text()


def test_max_map_drop_accepts_differing_detections_within_the_budget(demo, tmp_path, capsys) -> None:
    """compare --max-map-drop P: exit 0 when B's mAP is within P points of A's however the detections differ (an
    int8 build inside tune's budget exited 1 before); over the budget, or without the flag, differing outputs exit 1."""
    from fcos_offline.data.dumps import read_dumps, write_dumps
    from fcos_offline.data.info import make_info

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    assert main(["infer", "--model", str(demo.onnx), "--images", str(demo.images), "--output", str(a_dir), "--workers", "0"]) == 0
    b_dir.mkdir()
    for stem, (labels, dets) in read_dumps(a_dir).items():  # every box 3 px off: matched, but beyond the 1 px tolerance
        moved = dets.copy()
        moved[labels >= 0, :4] += 3.0
        write_dumps(b_dir, stem, labels, moved)
    info = tmp_path / "jpg.info"
    make_info("jpg", demo.images, info, workers=1)
    common = ("--annotations", demo.ann, "--info", info)
    code, plain = _compare(tmp_path / "plain", a_dir, b_dir, *common)
    drop = plain["map_drop_points"]
    assert code == 1 and not plain["within_tolerance"] and plain["accepted"] is False and drop is not None
    assert drop == pytest.approx(100 * (plain["a"]["mAP"]["bbox_mAP"] - plain["b"]["mAP"]["bbox_mAP"]))
    capsys.readouterr()
    code, within = _compare(tmp_path / "within", a_dir, b_dir, *common, "--max-map-drop", max(0.0, drop) + 0.05)
    assert code == 0 and within["accepted"] and not within["within_tolerance"]
    assert "within the" in capsys.readouterr().out
    if drop > 0.05:
        code, over = _compare(tmp_path / "over", a_dir, b_dir, *common, "--max-map-drop", drop - 0.05)
        assert code == 1 and not over["accepted"]
    assert main(["compare", str(a_dir), str(b_dir), "--max-map-drop", "0.3", "--output", str(tmp_path / "u")]) == 2
    assert "--annotations" in capsys.readouterr().err
