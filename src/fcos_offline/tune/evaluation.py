"""How ``tune`` measures accuracy: one engine's COCO mAP on the eval subset, and how much of a
mAP drop the eval images decide (its standard error)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fcos_offline.engine.base import Engine
from fcos_offline.errors import FcosError
from fcos_offline.progress import info, warn
from fcos_offline.tune.inputs import TuneData


def evaluate_engine(engine: Engine, data: TuneData, work: Path, batch_size: int, keep: Path | None = None, dumps_to: Path | None = None) -> float:
    """COCO bbox mAP (fraction) of ``engine`` on the eval subset through infer + postprocess, in ``work`` (removed after).

    ``keep``: where to keep the COCO results (for :func:`drop_spread`); ``dumps_to``: where to keep the dumps
    (for :func:`output_agreement`).
    """
    from fcos_offline.engine.infer import run_inference
    from fcos_offline.evaluate.postprocess import RESULTS_FILE, postprocess

    es = data.eval_set
    shutil.rmtree(work, ignore_errors=True)
    dumps = work / "dumps"
    workers = 0 if len(es.items) <= 16 else None  # a worker process only pays off on longer runs
    run_inference(engine, es.items, dumps, batch_size, warmup=0, perf_dir=work, workers=workers, show_progress=False)
    summary = postprocess(dumps, es.jpg_info, work / "eval", es.ann_file, *data.canvas, class_names=data.class_names)
    known = {Path(m["path"]).name for m in es.missing}
    lost = [f for f in summary["missing_dump_files"] if Path(f).name not in known]
    if summary.get("skipped") or lost:
        raise FcosError(f"evaluation of {work.name} skipped images: {summary.get('skipped') or lost}")
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / "eval" / RESULTS_FILE, keep)
    if dumps_to is not None:
        shutil.rmtree(dumps_to, ignore_errors=True)
        dumps_to.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dumps, dumps_to)
    shutil.rmtree(work, ignore_errors=True)
    return float(summary["bbox_mAP"])


def output_agreement(reference_dumps: Path, dumps: Path) -> dict[str, Any]:
    """How closely the outputs in ``dumps`` agree with the reference's on the same images: ``compare``'s figures and
    its tolerance (:func:`fcos_offline.compare.outputs.agreement`)."""
    from fcos_offline.compare.outputs import Tolerance, agreement
    from fcos_offline.data.dumps import read_dumps

    return agreement(read_dumps(reference_dumps), read_dumps(dumps), Tolerance())


def drop_spread(data: TuneData, reference: Path, best: Path, budget: float, flag: str = "--eval-images") -> dict[str, Any]:
    """The standard error (mAP points) of the drop from the ``reference`` to the ``best`` COCO results.

    From :func:`fcos_offline.evaluate.coco.map_difference_spread`; notes (with the image count
    that would do, and the ``flag`` that sets it) when it exceeds a third of ``budget``. Not
    measured below 4 eval images.
    """
    from fcos_offline.evaluate.coco import map_difference_spread

    n = len(data.eval_set.items)
    if n < 4:
        warn(f"{n} eval image(s): too few to measure how much of the mAP drop the image sample decides (4 at least)")
        return {"se_points": None, "images": n, "rounds": 0, "method": "not measured: fewer than 4 eval images"}
    spread = map_difference_spread(data.eval_set.ann_file, json.loads(reference.read_text()), json.loads(best.read_text()))
    se = 100.0 * spread["se"]
    out = {"se_points": se, "images": spread["images"], "rounds": spread["rounds"], "method": spread["method"]}
    if budget > 0 and se > budget / 3:
        # the standard error shrinks with the square root of the image count
        needed = int(math.ceil(spread["images"] * (se / (budget / 3)) ** 2 / 100.0) * 100)
        out["images_for_a_third_of_the_budget"] = needed
        info(
            f"{spread['images']} images judge the mAP drop to +-{se:.2f} points (standard error), more than a third of the "
            f"{budget:g}-point budget: about {needed} images ({flag} {needed}) would judge it to +-{budget / 3:.2f}"
        )
    return out
