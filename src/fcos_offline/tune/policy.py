"""The search policy: pure functions over trial records (no engine, no files).

Which configurations get an accuracy fallback, which are swept, which are re-timed, and which
one is chosen — all decided from measured :class:`Trial` records, so the policy is testable
without any engine installed.
"""

from __future__ import annotations

from typing import Any

from fcos_offline.tune.store import Trial
from fcos_offline.units import map_text


def within_budget(map_drop: float, budget: float) -> bool:
    """A drop (mAP points) within the budget (points), with float slack."""
    return map_drop <= budget + 1e-9


#: below this reference mAP (a fraction) a drop in mAP measures nothing: candidates are judged by agreement instead
MAP_FLOOR = 0.05
MAP = "mAP"
AGREEMENT = "agreement"


def floor_criterion(reference_map: float) -> tuple[str, str]:
    """How candidates are judged once the reference's mAP is known, and why in words: by their mAP drop, or by output
    agreement with the reference when that mAP is below :data:`MAP_FLOOR` (a build has nothing measurable to lose)."""
    if reference_map < MAP_FLOOR:
        return AGREEMENT, (
            f"the reference's mAP {map_text(reference_map, 2)} is below the {map_text(MAP_FLOOR, 0)} floor, so an mAP drop "
            "cannot show what a build loses"
        )
    return MAP, ""


def spread_criterion(se_points: float | None, images: int, budget: float) -> tuple[str, str]:
    """The same once a drop's standard error is known: agreement when the images that judged it leave it uncertain by
    more than a third of the budget (``se_points`` None: too few images to measure it)."""
    if budget > 0 and (se_points is None or se_points > budget / 3):
        if se_points is None:
            return AGREEMENT, f"{images} images are too few to measure how much of an mAP drop the image sample decides"
        return AGREEMENT, (
            f"on {images} images the mAP drop is judged only to +-{se_points:.2f} points (standard error), more than a third "
            f"of the {budget:g}-point budget, with no held-out images left to judge it on (or --holdout-images 0)"
        )
    return MAP, f"mAP drop within {budget:g} points"


def judged_within(trial: Trial, criterion: str, budget: float) -> bool:
    """Does ``trial`` hold the accuracy check: its mAP drop within ``budget`` points, or (``agreement``) its outputs within
    ``compare``'s tolerance of the reference's (no agreement measured: no)."""
    if criterion == AGREEMENT:
        return bool(trial.agreement and trial.agreement.get("within_tolerance"))
    return within_budget(trial.map_drop, budget)


def _accuracy_words(t: Trial, reference: Trial, criterion: str) -> str:
    if criterion == AGREEMENT and t.agreement:
        a = t.agreement
        return (
            f"outputs agree with the reference's ({a['matched']} of {a['detections_a']} detections matched, score error "
            f"max {a['score_err_max']:.1e}, box error max {a['box_err_px_max']:.2f} px)"
        )
    return f"mAP {map_text(t.bbox_mAP, 2)} vs {map_text(reference.bbox_mAP, 2)} (drop {t.map_drop:+.2f} points)"


def choose(trials: list[Trial], budget: float, reference: Trial, criterion: str = MAP) -> tuple[Trial, str]:
    """The fastest trial holding the accuracy check (ties: the smaller drop), with the reason in words."""
    ok = [t for t in trials if t.status == "ok"]
    within = [t for t in ok if t.within_budget]
    if not within:
        return reference, "nothing else holds the accuracy check: the reference configuration"
    best = min(within, key=lambda t: (t.ms_per_img, t.map_drop))
    rejected = sorted((t for t in ok if not t.within_budget and t.ms_per_img < best.ms_per_img), key=lambda t: t.ms_per_img)
    check = f"the {budget:g}-point mAP budget" if criterion == MAP else "compare's output tolerance of the reference"
    reason = (
        f"fastest of {len(within)} measured configurations within {check} "
        f"({len(ok)} measured): {best.ms_per_img:.1f} ms/img, {best.speedup_vs_reference:.2f}x ONNX Runtime's "
        f"default fp32 ({reference.ms_per_img:.1f} ms/img), {_accuracy_words(best, reference, criterion)}"
    )
    if best.candidate.float_groups:
        groups = best.candidate.float_groups
        reason += f"; {len(groups)} conv group(s) kept float by the accuracy fallback: {', '.join(groups)}"
    if rejected:
        r = rejected[0]
        reason += f"; faster but failing the check: {r.label} ({r.ms_per_img:.1f} ms/img, {_accuracy_words(r, reference, criterion)})"
    return best, reason


def fallback_bases(trials: list[Trial]) -> list[tuple[Trial, list[Trial]]]:
    """Per engine/quantizer family over budget: (its most accurate near-fastest model, the family), fastest family first.

    Only main-phase int8 trials (no float groups, default threads) that measured their own mAP count.
    """
    over = [
        t
        for t in trials
        if t.candidate.quantized and not t.candidate.float_groups and not t.within_budget and t.candidate.threads is None and t.accuracy_from == t.key
    ]
    families: dict[tuple[str, str], list[Trial]] = {}
    for t in over:
        families.setdefault((t.candidate.engine, t.candidate.kind), []).append(t)
    out = []
    for ts in sorted(families.values(), key=lambda ts: min(t.ms_per_img for t in ts)):
        fastest = min(t.ms_per_img for t in ts)
        base = min((t for t in ts if t.ms_per_img <= 1.1 * fastest), key=lambda t: t.map_drop)
        out.append((base, ts))
    return out


def fallback_worthwhile(trials: list[Trial], family: list[Trial]) -> bool:
    """Is returning convs to float worth trying, or is something within budget about as fast already?"""
    best_within = min((t.ms_per_img for t in trials if t.within_budget), default=float("inf"))
    return best_within > 1.1 * min(t.ms_per_img for t in family)


def best_float_ms(trials: list[Trial]) -> float | None:
    """The fastest float configuration within the budget (a fallback that is not faster has no point)."""
    return min((t.ms_per_img for t in trials if t.within_budget and not t.candidate.quantized), default=None)


def sweep_bases(trials: list[Trial], top: int) -> list[Trial]:
    """The fastest ``top`` configurations within the budget, one per accuracy id."""
    bases: list[Trial] = []
    seen: set[str] = set()
    for t in sorted((t for t in trials if t.within_budget), key=lambda t: t.ms_per_img):
        if t.accuracy_id not in seen:
            seen.add(t.accuracy_id)
            bases.append(t)
    return bases[:top]


def finalists(trials: list[Trial], reference_key: str, top: int) -> list[Trial]:
    """The fastest ``top`` within the budget by their first measurement (the reference excluded)."""
    within = [t for t in trials if t.within_budget and t.key != reference_key]
    return sorted(within, key=lambda t: t.first_ms)[:top]


#: the most held-out images an automatic held-out check uses
HOLDOUT_MAX_IMAGES = 2000


def holdout_size(spread: dict[str, Any] | None, option: int | None) -> int:
    """How many held-out images re-judge the chosen drop (0: no check).

    ``option`` None (automatic): as many as bring the drop's standard error to a third of the
    budget (``spread["images_for_a_third_of_the_budget"]``, present only when the eval images
    judged it worse), at most :data:`HOLDOUT_MAX_IMAGES`; 0: never; N: always N.
    """
    if option is not None:
        return option
    return min((spread or {}).get("images_for_a_third_of_the_budget") or 0, HOLDOUT_MAX_IMAGES)


def failed_holdout(checks: list[dict[str, Any]]) -> set[str]:
    """The accuracy ids that failed a held-out check: every configuration computing their numbers is over budget."""
    return {c["accuracy_id"] for c in checks if not c["within_budget"]}


def holdout_regrow(held: dict[str, Any], images: int, option: int | None, grown: bool) -> int:
    """A larger held-out set (0: keep this one): once, for the automatic check, when its own images
    judge the drop worse than a third of the budget (``held`` is their spread)."""
    if option is not None or grown:
        return 0
    needed = holdout_size(held, None)
    return needed if needed > images else 0
