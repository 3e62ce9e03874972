"""``fcos-offline tune``: accuracy-bounded search, fallback to float, resume, time budget, artifact.

The data: a tiny random-weight FCOS (6 classes, 128x192) on a few demo images whose ground truth
is the model's own confident fp32 detections ("pseudo labels"), so the fp32 mAP is high and any
int8 error shows up as a real mAP drop (a random model's mAP on the real labels would be ~0 and
every drop trivially 0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import pseudo_labelled_tiny

from fcos_offline.cli import main
from fcos_offline.errors import EXIT_SKIPS, EXIT_USAGE
from fcos_offline.tune.quantize import conv_groups
from fcos_offline.tune.search import TUNE_FILE, TuneOptions, Tuner, tune

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CANVAS = (128, 192)
N_IMAGES = 6
TRIAL_FIELDS = {
    "key",
    "engine",
    "precision",
    "threads",
    "batch_size",
    "bbox_mAP",
    "map_drop",
    "ms_per_img",
    "img_per_s",
    "size_mb",
    "float_groups",
    "float_nodes",
    "within_budget",
    "accuracy_from",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """tiny.onnx (dynamic batch), N_IMAGES demo images and pseudo-label annotations."""
    return pseudo_labelled_tiny(tmp_path_factory.mktemp("tune"), N_IMAGES, CANVAS)


def _opts(tiny: dict, output: Path, **kw) -> TuneOptions:
    base = dict(
        model=str(tiny["model"]),
        images=str(tiny["images"]),
        annotations=str(tiny["ann"]),
        output=str(output),
        eval_images=N_IMAGES,
        calib_images=N_IMAGES,
        max_map_drop=0.3,
        batch_sizes=(1, 2),
        threads=(1,),
        bench_runs=3,
        bench_seconds=0.2,
        warmup=1,
        sensitivity_images=2,
        max_fallback_steps=2,
        # int8 only (besides the fp32 reference), so every int8 model is faster than the best passing one and
        # gets its fallback; at most 2 steps each keeps the test short
        candidates=("onnxruntime/ort-qdq-u8s8-minmax-pc/fp32", "nncf-performance"),
    )
    base.update(kw)
    return TuneOptions(**base)


def _fake_bench(self, engine, batch_size: int) -> dict:
    """Deterministic timings (the machine is shared): int8 2.5x faster than float, each float group costs a little."""
    path = str(engine.source.path)
    ms = 10.0
    if "ort-qdq" in path or "nncf" in path:
        m = re.search(r"\+float(\d+)", path)
        ms = 4.0 + (0.2 * int(m.group(1)) if m else 0.0)
    ms /= 1.0 + 0.1 * (batch_size - 1)
    return {"ms_per_img": ms, "img_per_s": 1000.0 / ms, "runs": 1, "ms_per_batch_min": ms * batch_size}


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory) -> dict:
    """One search on the tiny model (budget 0.3 points), shared by several tests (timings faked)."""
    out = tmp_path_factory.mktemp("tuned") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Tuner, "bench", _fake_bench)
        result = tune(_opts(tiny, out))
    return {"out": out, "result": result}


def test_chosen_within_budget_and_documented_fields(tuned) -> None:
    result = json.loads((tuned["out"] / TUNE_FILE).read_text())
    page = (tuned["out"] / "report.html").read_text()  # the trials and the speed/drop plot, beside tune.json
    assert "chosen: " + result["chosen"]["label"] in page and page.count("<circle") == len([t for t in result["trials"] if t["status"] == "ok"])
    assert result == tuned["result"]
    ref = result["reference"]
    assert ref["bbox_mAP"] >= 0.9  # pseudo labels: fp32 reproduces them
    trials = result["trials"]
    assert len(trials) >= 5
    for t in trials:
        assert TRIAL_FIELDS <= set(t), TRIAL_FIELDS - set(t)
        assert 0.0 <= t["bbox_mAP"] <= 1.0  # a fraction
        assert t["map_drop"] == pytest.approx(100.0 * (ref["bbox_mAP"] - t["bbox_mAP"]))  # mAP points
        assert t["ms_per_img"] > 0 and t["img_per_s"] == pytest.approx(1000.0 / t["ms_per_img"])
        assert t["within_budget"] == (t["map_drop"] <= 0.3 + 1e-9)
    engines = {(t["engine"], t["precision"]) for t in trials}
    assert ("onnxruntime", "int8") in engines and ("openvino", "int8") in engines and ("onnxruntime", "fp32") in engines
    assert {t["batch_size"] for t in trials} == {1, 2}
    chosen = result["chosen"]
    assert chosen["key"] in {t["key"] for t in trials}
    assert chosen["map_drop"] <= 0.3 and chosen["within_budget"] and chosen["verified"]
    assert abs(chosen["bbox_mAP"] - ref["bbox_mAP"]) * 100 <= 0.3
    assert chosen["reason"] and "fastest" in chosen["reason"]
    spread = chosen["map_drop_spread"]  # how much of the drop the eval images decide
    if chosen["accuracy_id"] == next(t["accuracy_id"] for t in trials if t["key"] == ref["key"]):  # the reference's numbers
        assert spread is None and chosen["map_drop_se"] == 0.0
    else:
        assert spread["images"] == N_IMAGES and spread["se_points"] == chosen["map_drop_se"] >= 0.0
        assert ("images_for_a_third_of_the_budget" in spread) == (spread["se_points"] > 0.1)
    within = [t for t in trials if t["within_budget"]]
    assert chosen["trial_bbox_mAP"] == pytest.approx(chosen["bbox_mAP"], abs=1e-6)
    assert chosen["ms_per_img"] == min(t["ms_per_img"] for t in within)
    assert result["float_by_design"]["postprocess_nodes"] > 0 and "NonMaxSuppression" in result["float_by_design"]["postprocess_ops"]
    art = json.loads((tuned["out"] / "best" / "artifact.json").read_text())
    assert art["tuned"] and art["engine"] == chosen["engine"] and art["engine_options"]["threads"] == chosen["threads"]
    assert (tuned["out"] / "best" / art["model_file"]).is_file()


def test_fallback_returns_the_groups_with_the_largest_output_error_to_float(tiny, tuned) -> None:
    """int8 here loses tens of points: the fallback returns first the conv group whose int8 alone moves the head's
    outputs most, then the next two (1, 2, 4, ... groups), and those convs are really float in the model."""
    import onnx

    result = tuned["result"]
    sens = result["sensitivity"]
    scores = {g: v["score"] for g, v in sens["scores"].items()}
    assert len(scores) > 10 and all(v >= 0.0 for v in scores.values())
    assert sens["order"] == sorted(sens["order"], key=lambda g: -scores.get(g, 0.0))
    assert scores[sens["order"][0]] > scores[sens["order"][-1]]
    fb = {f["base"].split("|")[0] + "|" + f["base"].split("|")[1]: f for f in result["fallback"]}
    ort_fb = fb["onnxruntime|ort-qdq-u8s8-minmax-pc-gn"]
    assert [s["float_groups"] for s in ort_fb["steps"]] == [sens["order"][:1], sens["order"][:2]][: len(ort_fb["steps"])]
    first = ort_fb["steps"][-1]
    trial = next(t for t in result["trials"] if t["key"] == first["key"])
    groups = {g.name: g for g in conv_groups(tiny["model"])}
    assert sorted(trial["float_nodes"]) == sorted(n for g in first["float_groups"] for n in groups[g].nodes)
    model = onnx.load(str(tuned["out"] / trial["model"]))
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    for name in trial["float_nodes"]:
        w = convs[name].input[1]
        assert w not in producers or producers[w].op_type != "DequantizeLinear", name
    quantized = [n for n in convs.values() if n.name not in trial["float_nodes"] and n.name.startswith("/network/")]
    assert quantized and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in quantized)
    assert "nncf" in " ".join(fb)  # OpenVINO int8 got its fallback too
    assert ort_fb["stopped"]


def test_int8_float_ops_follow_the_cpus_native_bf16(tiny, tmp_path, monkeypatch) -> None:
    """Where OpenVINO has native bf16 (AMX, AVX-512 BF16), its int8 builds run their float ops (fallback convs
    included) in bf16 and, as twins, in fp32 (more accurate, and not always slower); elsewhere in fp32 only."""
    monkeypatch.setattr(Tuner, "bench", _fake_bench)
    runs = {}
    for native in (False, True):
        monkeypatch.setattr(Tuner, "has_bf16", lambda self, native=native: native)
        opts = _opts(tiny, tmp_path / str(native), candidates=("ort-qdq-u8s8-minmax-pc",), max_fallback_steps=1, sweep=False, confirm_top=0)
        runs[native] = tune(opts)
    for native, result in runs.items():
        rest = "bf16" if native else "fp32"
        assert result["machine"]["openvino_int8_float_ops"] == rest and result["machine"]["cores"] >= 1
        assert isinstance(result["machine"]["features"], list) and result["machine"]["cpu"]
        ov = [t for t in result["trials"] if t["engine"] == "openvino"]
        precisions = {"bf16", "fp32"} if native else {"fp32"}
        assert ov and {t["candidate"]["exec_precision"] for t in ov if not t["float_groups"]} == precisions
        fallback = [t for t in ov if t["float_groups"]]
        assert fallback and {t["candidate"]["exec_precision"] for t in fallback} <= precisions
        ort = [t for t in result["trials"] if t["engine"] == "onnxruntime"]
        assert ort and all(t["candidate"]["exec_precision"] == "fp32" for t in ort)


def test_too_few_eval_images_judge_by_output_agreement(tiny, tmp_path, monkeypatch, capsys) -> None:
    """3 eval images: the drop's standard error cannot be measured, so a drop inside even a 100-point budget decides
    nothing; tune says so, judges by agreement with the reference's outputs, and does not choose the int8 build whose
    outputs are beyond compare's tolerance (it chose it, "drop +- 0.00 (standard error)")."""
    monkeypatch.setattr(Tuner, "bench", _fake_bench)
    opts = _opts(
        tiny,
        tmp_path / "few",
        eval_images=3,
        max_map_drop=100.0,
        candidates=("onnxruntime/ort-qdq-u8s8-minmax-pc/fp32",),
        fallback=False,
        sweep=False,
        confirm_top=0,
    )
    result = tune(opts)
    chosen, check = result["chosen"], result["accuracy_check"]
    assert check["criterion"] == chosen["accuracy_check"] == "agreement" and "3 images are too few" in check["why"]
    assert check["eval_images"] == 3 and "judging by output agreement" in capsys.readouterr().err
    int8 = [t for t in result["trials"] if t["precision"] == "int8"]
    assert int8 and all(not t["agreement"]["within_tolerance"] and not t["within_budget"] for t in int8)
    assert chosen["precision"] == "fp32" and chosen["verified"] and chosen["agreement"]["within_tolerance"]


def test_tight_budget_chooses_no_drop(tiny, tuned, monkeypatch) -> None:
    """Budget 0: the finished trials are reused, and the choice has no mAP drop at all."""
    monkeypatch.setattr(Tuner, "bench", _fake_bench)
    result = tune(_opts(tiny, tuned["out"], max_map_drop=0.0))
    chosen = result["chosen"]
    assert chosen["map_drop"] <= 0.0 + 1e-9
    over = [t for t in result["trials"] if t["precision"] == "int8" and t["map_drop"] > 0]
    assert over and all(not t["within_budget"] for t in over)
    tune(_opts(tiny, tuned["out"]))  # restore the 0.3 choice for the tests that follow


def test_resume_skips_finished_trials(tiny, tuned, monkeypatch) -> None:
    before = {t["key"]: t for t in json.loads((tuned["out"] / TUNE_FILE).read_text())["trials"]}

    def no_bench(self, engine, batch_size):
        raise AssertionError("a finished trial was run again")

    monkeypatch.setattr(Tuner, "bench", no_bench)
    result = tune(_opts(tiny, tuned["out"]))
    after = {t["key"]: t for t in result["trials"]}
    assert after.keys() == before.keys()
    assert all(after[k]["ms_per_img"] == before[k]["ms_per_img"] for k in before)
    assert result["chosen"]["key"] == tuned["result"]["chosen"]["key"]


def test_time_budget_stops_the_search(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "short"
    code = main(
        [
            "tune",
            "--model",
            str(tiny["model"]),
            "--images",
            str(tiny["images"]),
            "--annotations",
            str(tiny["ann"]),
            "--output",
            str(out),
            "--eval-images",
            str(N_IMAGES),
            "--calib-images",
            str(N_IMAGES),
            "--time-budget",
            "0.01",
            "--bench-runs",
            "3",
            "--bench-seconds",
            "0.2",
        ]
    )
    assert code == EXIT_SKIPS
    result = json.loads((out / TUNE_FILE).read_text())
    assert [t["key"] for t in result["trials"]] == [result["reference"]["key"]]
    assert result["skipped"] and all(s["reason"] == "time budget" for s in result["skipped"])
    assert result["chosen"]["key"] == result["reference"]["key"]
    assert (out / "best" / "artifact.json").is_file()
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "not tried" in printed


def test_artifact_runs_with_infer_and_gives_the_recorded_map(tiny, tuned, tmp_path) -> None:
    from fcos_offline.evaluate.postprocess import postprocess

    best = tuned["out"] / "best"
    chosen = tuned["result"]["chosen"]
    dumps = tmp_path / "dumps"
    code = main(["infer", "--model", str(best), "--images", str(tiny["images"]), "--output", str(dumps), "--batch-size", str(chosen["batch_size"])])
    assert code == 0
    summary = json.loads((dumps / "summary.json").read_text())
    assert summary["engine"]["engine"] == chosen["engine"]  # taken from artifact.json, not --engine's default
    assert summary["engine"]["threads"] == chosen["threads"]
    ev = postprocess(dumps, tiny["root"] / "jpg.info", tmp_path / "eval", tiny["ann"], *CANVAS, class_names=[str(i) for i in range(6)])
    assert ev["bbox_mAP"] == pytest.approx(chosen["bbox_mAP"], abs=1e-9)


def test_usage_errors(tiny, tmp_path, capsys) -> None:
    assert main(["tune", "--model", str(tiny["model"]), "--output", str(tmp_path / "x")]) == EXIT_USAGE
    assert main(["tune", "--coco", str(tmp_path), "--output", str(tmp_path / "x")]) == EXIT_USAGE
    assert (
        main(
            [
                "tune",
                "--model",
                str(tiny["model"]),
                "--images",
                str(tiny["images"]),
                "--annotations",
                str(tiny["ann"]),
                "--max-map-drop",
                "-1",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err


def test_a_best_folder_that_is_not_an_artifact_is_refused_before_the_search(tmp_path, capsys) -> None:
    """tune saves its choice as <output>/best: someone's folder there is refused at the start, not after the search."""
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["tune", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no artifact.json" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # nothing was started


def test_a_class_count_the_annotations_lack_is_refused_before_the_reference(tmp_path, capsys) -> None:
    """The 6-class demo model against COCO's annotations (23 categories in the sample): refused while
    the data is prepared, before the reference trial runs (it failed only after it)."""
    from conftest import shared_data_dir

    from fcos_offline.demo import DEMO_CHECKPOINT

    out = tmp_path / "t"
    code = main(["tune", "--model", str(DEMO_CHECKPOINT), "--coco", str(shared_data_dir()), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "the model has 6 classes but the annotation file lists 23 categories" in err
    assert not (out / TUNE_FILE).exists() and "reference" not in err


def test_a_reference_map_near_zero_judges_by_output_agreement(tiny, tmp_path, monkeypatch, capsys) -> None:
    """The random tiny model against the demo's real labels: reference mAP ~0, so every build's drop is 0 and the mAP
    check is vacuous (it chose int8, whose outputs compare then found far off). tune says so, judges by agreement with
    the reference's outputs, records it, and what it chooses is within compare's tolerance of the reference."""
    monkeypatch.setattr(Tuner, "bench", _fake_bench)
    real = tiny["root"] / "data" / "annotations" / "instances_val2017.json"
    out = tmp_path / "zero"
    result = tune(_opts(tiny, out, annotations=str(real), fallback=False, sweep=False))
    check, chosen = result["accuracy_check"], result["chosen"]
    assert result["reference"]["bbox_mAP"] < 0.05 and check["criterion"] == "agreement" and "below the 5% floor" in check["why"]
    assert "judging by output agreement with the reference" in capsys.readouterr().err
    for t in result["trials"]:
        assert t["within_budget"] == t["agreement"]["within_tolerance"]  # the drop (0 for all) decides nothing
    assert chosen["agreement"]["within_tolerance"]
    code = main(["compare", str(tiny["model"]), str(out / "best"), "--images", str(tiny["images"]), "--output", str(tmp_path / "cmp")])
    assert code == 0, "compare finds the chosen build's outputs out of tolerance against the reference"


def test_the_table_is_one_measurement_or_says_how_old_each_row_is(tuned) -> None:
    """Rows re-timed with the reference are compared with that timing; the others with the reference's timing of their
    own phase (recorded), and marked with their age; a legend explains every marker (the reference re-timed at 8.9 ms
    made an unre-timed 38 ms row read 0.23x, against 41.7 ms when it was timed)."""
    from rich.console import Console

    from fcos_offline.cli.tune import format_table

    result = json.loads((tuned["out"] / TUNE_FILE).read_text())
    trials = {t["key"]: t for t in result["trials"]}
    ref = trials[result["reference"]["key"]]
    assert result["confirmation"]["at"] >= max(t["timed_at"] for t in trials.values() if not t["confirmed_runs"])
    stale = [t for t in trials.values() if not t["confirmed_runs"]]
    assert stale and any(t["confirmed_runs"] for t in trials.values() if t["key"] != ref["key"])
    for t in trials.values():
        assert t["speedup_vs_reference"] == pytest.approx(t["reference_ms"] / t["ms_per_img"])
        if t["confirmed_runs"]:
            assert t["reference_ms"] == ref["ms_per_img"]  # timed in the same interleaved rounds
        else:
            assert t["reference_ms"] in (ref["ms_per_img_first"], ref["ms_per_img"])  # the reference timing of its phase
    console = Console(record=True, width=260)
    console.print(format_table(result))
    text = console.export_text()
    for marker in ("→ chosen", "✗ fails the accuracy check", "N* = the engine's default", "· = not re-timed", "± their spread"):
        assert marker in text, marker
    assert text.count("re-timed") >= 2 and "· " in text  # re-timed rows say so; the others show their age
