"""``tune``'s held-out check: the chosen configuration's drop re-judged on images the search never saw.

The data: the tiny pseudo-labelled model of ``tune/test_search.py`` on 16 demo images: the first 6 (by file
name) are the eval images, the next 4 the calibration images, the last 6 are left for the check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import pseudo_labelled_tiny

from fcos_offline.tune import policy
from fcos_offline.tune import search as search_mod
from fcos_offline.tune.search import TUNE_FILE, TuneOptions, Tuner, tune

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CANVAS = (128, 192)
N_EVAL, N_CALIB, N_ALL = 6, 4, 16
BUDGET = 80.0  # points: both int8 builds hold it on the eval images (the tiny model loses tens of points)
ORT_INT8 = "onnxruntime/ort-qdq-u8s8-minmax-pc/fp32"


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> dict:
    return pseudo_labelled_tiny(tmp_path_factory.mktemp("holdout"), N_ALL, CANVAS)


def _bench(self, engine, batch_size: int) -> dict:
    """Deterministic timings: ONNX Runtime int8 fastest, then NNCF int8, then float."""
    path = str(engine.source.path)
    ms = 3.0 if "ort-qdq" in path else 4.0 if "nncf" in path else 10.0
    return {"ms_per_img": ms, "img_per_s": 1000.0 / ms, "runs": 1, "ms_per_batch_min": ms * batch_size}


def _opts(data: dict, out: Path, **kw) -> TuneOptions:
    base = dict(
        model=str(data["model"]),
        images=str(data["images"]),
        annotations=str(data["ann"]),
        output=str(out),
        eval_images=N_EVAL,
        calib_images=N_CALIB,
        holdout_images=N_ALL - N_EVAL - N_CALIB,
        max_map_drop=BUDGET,
        threads=(1,),
        bench_runs=3,
        bench_seconds=0.2,
        warmup=1,
        candidates=(ORT_INT8, "nncf-performance"),
        fallback=False,
        sweep=False,
        confirm_top=0,
    )
    base.update(kw)
    return TuneOptions(**base)


def _check_record(result: dict, check: dict) -> None:
    """A check's numbers are its own: the drop of its mAP from the reference's on the same held-out images."""
    assert check["images"] == N_ALL - N_EVAL - N_CALIB
    assert check["map_drop"] == pytest.approx(100.0 * (check["reference_bbox_mAP"] - check["bbox_mAP"]))
    assert check["within_budget"] == (check["map_drop"] <= BUDGET + 1e-9)
    assert check["reference_bbox_mAP"] >= 0.9  # pseudo labels: fp32 reproduces them on unseen images too
    assert check["map_drop_spread"]["images"] == check["images"] and check["map_drop_se"] == check["map_drop_spread"]["se_points"]
    trial = next(t for t in result["trials"] if t["key"] == check["key"])
    assert check["eval_map_drop"] == pytest.approx(trial["map_drop"])


def test_chosen_drop_rejudged_on_images_neither_evaluated_nor_calibrated_on(tiny16, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Tuner, "bench", _bench)
    out = tmp_path / "out"
    result = tune(_opts(tiny16, out))
    names = sorted(p.name for p in tiny16["images"].iterdir())
    held = sorted(p.name for p in (out / "work" / "holdout" / "images").iterdir())
    evaluated = sorted(p.name for p in (out / "work" / "data" / "eval" / "images").iterdir())
    assert evaluated == names[:N_EVAL] and held == names[N_EVAL + N_CALIB :]  # calibration took the 4 in between
    checks = result["holdout"]["checks"]
    assert checks and checks[0]["key"] == next(t["key"] for t in result["trials"] if t["engine"] == "onnxruntime" and t["precision"] == "int8")
    for check in checks:
        _check_record(result, check)
    chosen = result["chosen"]
    if chosen["key"] == result["reference"]["key"]:
        assert all(not c["within_budget"] for c in checks)
    else:
        assert chosen["holdout"] == next(c for c in checks if c["accuracy_id"] == chosen["accuracy_id"]) and chosen["holdout"]["within_budget"]
        assert all(not c["within_budget"] for c in checks[:-1])  # each earlier choice failed its check
        art = json.loads((out / "best" / "artifact.json").read_text())
        assert art["tuning"]["holdout"]["map_drop"] == pytest.approx(chosen["holdout"]["map_drop"])


def test_over_budget_on_held_out_images_chooses_again_and_resumes(tiny16, tmp_path, monkeypatch) -> None:
    """ONNX Runtime int8, the fastest within budget on the eval images, does worse on the held-out ones: not chosen;
    its fallback goes on (each step chosen, checked and, faked worse too, rejected) before NNCF int8 is chosen."""
    monkeypatch.setattr(Tuner, "bench", _bench)
    real = search_mod.evaluate_engine

    def worse_held_out(engine, data, work, batch_size, keep=None, dumps_to=None) -> float:
        value = real(engine, data, work, batch_size, keep, dumps_to)
        held_out = "holdout" in work.parts
        return max(0.0, value - 0.95) if held_out and "ort-qdq" in str(engine.source.path) else value

    monkeypatch.setattr(search_mod, "evaluate_engine", worse_held_out)
    out = tmp_path / "out"
    result = tune(_opts(tiny16, out, fallback=True, max_fallback_steps=2))
    checks = result["holdout"]["checks"]
    ort = checks[0]
    assert "ort-qdq" in ort["accuracy_id"] and not ort["within_budget"] and ort["map_drop"] > BUDGET
    assert ort["eval_map_drop"] <= BUDGET  # it held the budget on the eval images: that is why it was chosen first
    for check in checks:
        _check_record(result, check)
    chosen = result["chosen"]
    assert chosen["accuracy_id"] != ort["accuracy_id"]
    assert all(not t["within_budget"] for t in result["trials"] if t["accuracy_id"] == ort["accuracy_id"])
    fallback = next(f for f in result["fallback"] if f["base"] == ort["key"])  # the rejected model's own fallback
    assert len(fallback["steps"]) == 2 and all(s["map_drop"] <= BUDGET for s in fallback["steps"][:1])
    ort_checks = [c for c in checks if "ort-qdq" in c["accuracy_id"]]
    assert [c["key"] for c in ort_checks] == [ort["key"], *(s["key"] for s in fallback["steps"] if s["map_drop"] <= BUDGET)]
    assert all(not c["within_budget"] for c in ort_checks)
    if chosen["key"] != result["reference"]["key"]:
        assert chosen["holdout"]["within_budget"] and "nncf" in chosen["accuracy_id"]

    def no_evaluation(*args, **kw) -> float:
        raise AssertionError("a finished held-out evaluation was run again")

    monkeypatch.setattr(search_mod, "evaluate_engine", no_evaluation)
    monkeypatch.setattr(
        Tuner, "verify_artifact", lambda self, best, bs: (self.state.trials[chosen["key"]].bbox_mAP, self.state.trials[chosen["key"]].agreement)
    )
    again = tune(_opts(tiny16, out))
    assert again["chosen"]["key"] == chosen["key"] and again["holdout"]["checks"] == checks
    assert json.loads((out / TUNE_FILE).read_text())["holdout"]["checks"] == checks


def test_holdout_size() -> None:
    """Automatic: as many images as the eval images' spread asks for, at most the cap; 0: never; N: always N."""
    needs = {"se_points": 0.24, "images": 100, "images_for_a_third_of_the_budget": 600}
    judged = {"se_points": 0.05, "images": 100}
    assert policy.holdout_size(needs, None) == 600
    assert policy.holdout_size(judged, None) == 0 and policy.holdout_size(None, None) == 0
    assert policy.holdout_size({**needs, "images_for_a_third_of_the_budget": 50_000}, None) == policy.HOLDOUT_MAX_IMAGES
    assert policy.holdout_size(needs, 0) == 0
    assert policy.holdout_size(judged, 300) == 300


def test_automatic_check_takes_more_images_when_its_own_spread_asks(tiny16, tmp_path, monkeypatch) -> None:
    """Automatic size: the eval images' spread asks for 3 held-out images; those 3 judge the drop loosely
    and ask for 6, so the check is made again on 6 (once), and that is the recorded verdict. The 6 still judge it
    loosely (faked) and no images are left: the mAP drop cannot decide, so tune judges by output agreement."""
    monkeypatch.setattr(Tuner, "bench", _bench)
    real = search_mod.drop_spread
    asked: list[int] = []

    def spread(data, reference, best, budget, flag="--eval-images"):
        out = real(data, reference, best, budget, flag)
        asked.append(out["images"])
        return {**out, "se_points": budget, "images_for_a_third_of_the_budget": 3 if flag == "--eval-images" else 6}

    monkeypatch.setattr(search_mod, "drop_spread", spread)
    result = tune(_opts(tiny16, tmp_path / "grow", holdout_images=None))
    held = result["holdout"]["checks"][0]
    assert asked == [N_EVAL, 3, 6]  # eval images, the first held-out set, the grown one (not grown again)
    assert held["images"] == 6 == result["holdout"]["requested"] and result["holdout"]["grown"]
    _check_record(result, held)
    check = result["accuracy_check"]
    assert check["criterion"] == result["chosen"]["accuracy_check"] == "agreement" and "on 6 images" in check["why"]
    assert result["chosen"]["agreement"]["within_tolerance"]


def test_holdout_regrow() -> None:
    """Once, for the automatic check only, up to the cap, and only to more images than it had."""
    asks = {"se_points": 0.2, "images": 300, "images_for_a_third_of_the_budget": 500}
    assert policy.holdout_regrow(asks, 300, None, grown=False) == 500
    assert policy.holdout_regrow(asks, 300, None, grown=True) == 0
    assert policy.holdout_regrow(asks, 300, 300, grown=False) == 0  # the user's N is kept
    assert policy.holdout_regrow({"se_points": 0.05, "images": 300}, 300, None, grown=False) == 0
    assert policy.holdout_regrow({**asks, "images_for_a_third_of_the_budget": 9000}, 300, None, grown=False) == policy.HOLDOUT_MAX_IMAGES
