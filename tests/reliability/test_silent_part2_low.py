"""Reliability: nothing silently wrong, part 2 (issue #26), low items.

- ``compare`` counts an image whose dump holds NaN (or is truncated) as differing and lists it,
  instead of stopping at the first such dump;
- ``tune`` refuses a demo eval/calibration/held-out count above the demo's cap in one line, before
  generating any image;
- ``tune --time-budget``: an accuracy fallback that starts after the budget ran out measures no
  sensitivity (the skippable phases are skipped), and the help says what the budget bounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from badinputs import (
    assert_clean,
    cli,
    nonfinite_dump,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
)

# --------------------------------------------------------------------------- compare and NaN dumps


def _dumps(folder: Path, stems: list[str]) -> None:
    from fcos_offline.data.dumps import write_dumps

    labels = np.full(100, -1, np.int64)
    dets = np.zeros((100, 5), np.float32)
    labels[:2] = [0, 2]
    dets[:2] = [[10, 10, 50, 40, 0.9], [20, 20, 60, 70, 0.8]]
    for stem in stems:
        write_dumps(folder, stem, labels, dets)


def test_compare_counts_a_nan_dump_as_a_differing_image(tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _dumps(a, ["im0", "im1", "im2"])
    _dumps(b, ["im0", "im2"])
    nonfinite_dump(b, "im1", float("nan"))
    out = tmp_path / "cmp"
    code, stdout, stderr = cli(capsys, "compare", a, b, "--output", out)
    assert_clean(code, stdout, stderr, 1, "im1", "NaN")
    record(
        "a dump holding NaN on one side",
        "compare",
        code,
        stdout,
        "that image counted as differing and listed (was: the first such dump stopped the comparison)",
        "im1:",
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["overall"]["images"] == 2  # the two readable images were compared ...
    assert report["overall"]["images_unreadable"] == ["im1"]  # ... and the third counted as differing, not as "only in A"
    assert report["overall"]["images_only_in_a"] == [] and report["within_tolerance"] is False
    assert [(u["side"], u["stem"], Path(u["path"]).name) for u in report["unreadable"]] == [("b", "im1", "im1_2.bin")]
    same = tmp_path / "same"
    assert cli(capsys, "compare", a, a, "--output", same)[0] == 0  # a clean pair still holds the tolerance


# --------------------------------------------------------------------------- tune: the demo's image counts


@pytest.mark.parametrize("flag", ["--eval-images", "--calib-images", "--holdout-images"])
def test_tune_refuses_a_demo_count_above_the_cap_before_generating_images(flag, tmp_path, capsys, monkeypatch) -> None:
    from fcos_offline.tune import inputs
    from fcos_offline.tune.inputs import DEMO_MAX_IMAGES

    def generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("demo images generated")  # the old behaviour: 100 M of them

    monkeypatch.setattr(inputs, "demo_split", generate)
    out = tmp_path / "tuned"
    code, stdout, stderr = cli(capsys, "tune", "--output", out, flag, 100_000_000)
    assert_clean(code, stdout, stderr, 2, flag, f"{DEMO_MAX_IMAGES:,}")
    record(f"tune demo {flag} 100000000", "tune", code, stderr, "refused in one line (was: began generating 100 M demo images)")
    assert stderr.strip().count("\n") == 0
    assert not (out / "work").exists()  # nothing generated


# --------------------------------------------------------------------------- tune: what the time budget bounds


def test_a_fallback_after_the_time_budget_measures_no_sensitivity(monkeypatch) -> None:
    """The sensitivity probe (quantize, run the model per conv group) once ran after the budget was spent."""
    from fcos_offline.tune.inputs import TuneOptions
    from fcos_offline.tune.search import Tuner
    from fcos_offline.tune.space import ORT_QDQ_DEFAULT, Candidate

    tuner = Tuner(TuneOptions(time_budget=1.0))
    tuner.deadline = tuner.start - 1.0  # spent
    probed: list[bool] = []
    monkeypatch.setattr(tuner, "_ensure_sensitivity", lambda: probed.append(True) or {})
    base = Candidate("onnxruntime", f"ort-qdq:{ORT_QDQ_DEFAULT}")
    assert tuner.fallback(base, None) is None
    assert not probed
    assert {"key": f"fallback {base.key}", "reason": "time budget"} in tuner.state.skipped


def test_the_time_budget_help_says_what_it_bounds(capsys) -> None:
    from fcos_offline.cli import main

    assert main(["tune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--time-budget" in text and "reference trial" in text and "always run" in text
