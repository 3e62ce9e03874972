"""``fcos-offline tune`` on the shipped demo model and the demo data: the default search holds the budget.

Its own module, so that the parallel test run can start it first, beside everything else.
"""

from __future__ import annotations

import pytest

from fcos_offline.tune.search import TuneOptions, tune

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.mark.slow
def test_demo_model_tune_within_budget(tmp_path) -> None:
    """The shipped demo model on the demo data with the default search (timing shortened), budget 0.5 points,
    on 100 eval images: they judge the drop to about +-0.2 points, so the choice is re-judged on unseen images.

    At 0.5 points some int8 configuration holds the budget on the eval images, and the chosen one
    holds it on the unseen images too (at 0.3 on these 100 images no int8 build does: they favour
    int8 by about 0.2 points, and the search walks its fallback, minutes longer; README: Tuning).
    """
    from fcos_offline.report.run import DEMO_CHECKPOINT

    if not DEMO_CHECKPOINT.is_file():
        pytest.skip("the demo model is not shipped yet")
    budget = 0.5
    opts = TuneOptions(
        output=str(tmp_path / "demo"), eval_images=100, max_map_drop=budget, bench_runs=3, bench_seconds=1, threads=(2,), confirm_top=1
    )
    result = tune(opts)
    chosen = result["chosen"]
    assert chosen["verified"] and chosen["map_drop"] <= budget
    assert result["reference"]["bbox_mAP"] >= 0.5  # the shipped model is a real detector on its data
    int8 = [t for t in result["trials"] if t["precision"] == "int8"]
    assert {t["engine"] for t in int8} == {"onnxruntime", "openvino"}
    assert any(t["within_budget"] for t in int8)  # some int8 configuration holds the budget (held-out images included)
    assert chosen["speedup_vs_reference"] >= 1.0
    spread = chosen["map_drop_spread"]
    if spread and spread["se_points"] > budget / 3:  # 100 eval images judge the drop loosely: re-judged on unseen images
        held = chosen["holdout"]
        assert held["within_budget"] and held["map_drop"] <= budget
        assert held["images"] == result["holdout"]["requested"] > spread["images"]
        assert held["map_drop_se"] < spread["se_points"]  # more images, a tighter judgement
