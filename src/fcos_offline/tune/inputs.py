"""What ``tune`` works on: its options, their validation, the model to tune and the data to judge it on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcos_offline.data.annotations import load_annotations
from fcos_offline.data.dataset import EvalSet, class_names_for, prepare_eval_set, resolve_source
from fcos_offline.data.letterbox import DEFAULT_CANVAS
from fcos_offline.demo.synthetic import demo_split
from fcos_offline.engine.artifact import ARTIFACT_FILE
from fcos_offline.engine.backends import CHECKPOINT_SUFFIXES
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.io import check_output_apart, check_replaceable
from fcos_offline.progress import warn
from fcos_offline.tune.quantize import CALIB_METHODS
from fcos_offline.tune.space import TUNE_ENGINES

#: eval images by default, the demo's too: on the demo model 100 images judged the int8 builds' drop
#: to about +-0.2 points and 0.2 points too low; 500 judge it to about +-0.08 (README: Tuning)
EVAL_IMAGES = 500
#: the most demo images tune generates for each of its eval, calibration and held-out sets (more is refused in one line)
DEMO_MAX_IMAGES = 10_000


@dataclass
class TuneOptions:
    """Everything ``tune`` needs; with no model and no data it tunes the demo model on the demo data."""

    model: str | None = None
    coco: str | None = None
    images: str | None = None
    annotations: str | None = None
    output: str = "tuned"
    calib_images: int | None = None  # default 200
    eval_images: int | None = None  # default EVAL_IMAGES (the demo's too)
    max_map_drop: float = 0.3
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int, ...] | None = None  # default: all cores and half of them
    engines: tuple[str, ...] = TUNE_ENGINES
    calib_methods: tuple[str, ...] = CALIB_METHODS
    time_budget: float | None = None
    bench_runs: int = 10
    bench_seconds: float = 20.0
    warmup: int = 2
    sensitivity_images: int = 4
    shape: tuple[int, int] | None = None  # canvas when exporting a checkpoint (demo: the demo canvas)
    fresh: bool = False
    sweep_top: int = 2
    confirm_top: int = 3  # re-time the reference and this many finalists, interleaved (0: off)
    holdout_images: int | None = None  # None: held-out check when needed (policy.holdout_size); N: always, on N images; 0: off
    candidates: tuple[str, ...] | None = None  # restrict the candidate list (see tune.space.candidate_list)
    fallback: bool = True
    max_fallback_steps: int | None = None  # None: until the budget holds or no speedup is left
    sweep: bool = True
    demo_checkpoint: str | None = None  # default: fcos_offline.demo.DEMO_CHECKPOINT


@dataclass
class TuneData:
    """What the search evaluates and calibrates on."""

    eval_set: EvalSet
    calib_paths: list[str]
    canvas: tuple[int, int]
    class_names: list[str] | None
    description: str


#: the chosen configuration's artifact folder inside ``--output``
BEST_DIR = "best"


def validate(o: TuneOptions) -> None:
    """Usage errors first, before any image or model is looked at (and before a search ``best/`` could not be saved)."""
    if o.max_map_drop < 0:
        raise UsageError("--max-map-drop must be >= 0 (mAP points)")
    if not o.batch_sizes or any(b < 1 for b in o.batch_sizes):
        raise UsageError("batch sizes must be >= 1")
    if o.threads and any(t < 1 for t in o.threads):
        raise UsageError("--threads values must be >= 1")
    for n, v in (("--calib-images", o.calib_images), ("--eval-images", o.eval_images)):
        if v is not None and v < 1:
            raise UsageError(f"{n} must be >= 1")
    if o.holdout_images is not None and o.holdout_images < 0:
        raise UsageError("--holdout-images must be >= 0 (0: no held-out check)")
    if o.time_budget is not None and o.time_budget <= 0:
        raise UsageError("--time-budget must be > 0 seconds")
    bad = [e for e in o.engines if e not in TUNE_ENGINES]
    if bad:
        raise UsageError(f"unknown engine(s) {', '.join(bad)} (choose {', '.join(TUNE_ENGINES)})")
    bad = [m for m in o.calib_methods if m not in CALIB_METHODS]
    if bad:
        raise UsageError(f"unknown calibration method(s) {', '.join(bad)} (choose from {', '.join(CALIB_METHODS)})")
    demo = not (o.model or o.coco or o.images)
    for n, v in (("--eval-images", o.eval_images), ("--calib-images", o.calib_images), ("--holdout-images", o.holdout_images)):
        if demo and v is not None and v > DEMO_MAX_IMAGES:
            raise UsageError(f"{n} {v}: the demo generates its images, at most {DEMO_MAX_IMAGES:,} (give --model and --coco for more)")
    if not demo and not o.model:
        raise UsageError("--coco/--images need --model (the demo model only fits the demo data)")
    if o.model and not (o.coco or o.images):
        raise UsageError("--model needs data: --coco DIR (or --images DIR and --annotations FILE)")
    if o.images and not o.annotations:
        raise UsageError("--images needs --annotations")
    check_output_apart([o.output], [o.model, o.coco, o.images, o.annotations, o.demo_checkpoint], inside_ok=True)  # images: never listed below
    check_replaceable(Path(o.output) / BEST_DIR, ARTIFACT_FILE)


def prepare_model(opts: TuneOptions, out: Path, demo: bool) -> Path:
    """The ONNX model to tune (exported from a checkpoint, or the demo model, when needed)."""
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import DEMO_CANVAS
    from fcos_offline.export.cache import cached_export

    if demo:
        ckpt = Path(opts.demo_checkpoint or DEMO_CHECKPOINT)
        if not ckpt.is_file():
            raise FcosError(f"{ckpt}: the demo model is missing; give --model and --coco to tune your own model")
        shape = tuple(opts.shape or DEMO_CANVAS)
    else:
        src = Path(opts.model).resolve()  # type: ignore[arg-type]
        if src.is_dir():
            raise UsageError(f"{src}: tune takes an exported .onnx or a checkpoint, not an artifact folder (it builds its own)")
        if not src.is_file():
            raise FcosError(f"{src}: no such model file")
        if src.suffix.lower() == ".onnx":
            return src
        if src.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise UsageError(f"{src}: tune takes an exported .onnx (dynamic batch preferred) or a checkpoint")
        ckpt, shape = src, tuple(opts.shape or DEFAULT_CANVAS)
    onnx_path, _ = cached_export(ckpt, out / "work", shape)  # type: ignore[arg-type]
    return onnx_path.resolve()


def prepare_data(o: TuneOptions, out: Path, demo: bool, metadata: dict[str, Any], canvas: tuple[int, int]) -> TuneData:
    """The evaluation set and the calibration images (never the eval images where others exist); missing ones are in ``eval_set.missing``."""
    from fcos_offline.data.preprocess import list_images

    data_dir = out / "work" / "data"
    if demo:
        from fcos_offline.demo import DEMO_TRAIN_SEED
        from fcos_offline.demo.synthetic import DEMO_VAL_SEED

        n_eval, n_calib = o.eval_images or EVAL_IMAGES, o.calib_images or 200
        val = demo_split(data_dir / "demo_val", "val", n_eval, DEMO_VAL_SEED)
        train = demo_split(data_dir / "demo_train", "train", n_calib, DEMO_TRAIN_SEED)
        eval_set = prepare_eval_set(data_dir / "eval", val / "val2017", val / "annotations" / "instances_val2017.json", n_eval, demo=True)
        calib = [str(p) for p in list_images(train / "train2017") if p.is_file()][:n_calib]
        description = (
            f"demo: {n_eval} validation images (seed {DEMO_VAL_SEED}), {n_calib} calibration images from the train split (seed {DEMO_TRAIN_SEED})"
        )
    else:
        n_eval, n_calib = o.eval_images or EVAL_IMAGES, o.calib_images or 200
        images_dir, ann = resolve_source(o.coco, o.images, o.annotations)
        eval_set = prepare_eval_set(data_dir / "eval", images_dir, ann, n_eval)
        if len(eval_set.items) + len(eval_set.missing) < n_eval:
            warn(f"only {len(eval_set.items)} annotated images available for evaluation (asked for {n_eval})")
        eval_paths = {it.path for it in eval_set.items} | {m["path"] for m in eval_set.missing}
        calib = [str(p) for p in list_images(images_dir) if p.is_file() and str(p) not in eval_paths][:n_calib]
        if len(calib) < n_calib:
            extra = [it.path for it in eval_set.items][: n_calib - len(calib)]
            if extra:
                warn(f"only {len(calib)} images outside the eval subset; calibration also uses {len(extra)} eval images")
            calib += extra
        used = len(eval_set.items)
        asked = "" if used + len(eval_set.missing) >= n_eval else f" (asked for {n_eval}; no more are annotated)"
        description = (
            f"{images_dir}: {used} annotated images (the first by file name){asked} for mAP; {len(calib)} calibration "
            "images (not in the eval subset where possible)"
        )
    return TuneData(eval_set, calib, canvas, class_names_for(metadata, eval_set.ann_file), description)


def holdout_data(o: TuneOptions, out: Path, data: TuneData, num_images: int) -> TuneData | None:
    """Up to ``num_images`` annotated images the search never saw (neither evaluated nor calibrated on), in
    file-name order after those; the demo's are the validation split's next images. None when there are none."""
    listing = out / "work" / "holdout"
    if data.eval_set.demo:
        from fcos_offline.demo.synthetic import DEMO_VAL_SEED

        first = o.eval_images or EVAL_IMAGES
        root = demo_split(out / "work" / "data" / "demo_holdout", "val", num_images, DEMO_VAL_SEED, first=first)
        eval_set = prepare_eval_set(listing, root / "val2017", root / "annotations" / "instances_val2017.json", num_images, demo=True)
        what = f"demo validation images {first + 1}-{first + num_images} (seed {DEMO_VAL_SEED})"
    else:
        images_dir, ann = resolve_source(o.coco, o.images, o.annotations)
        es = data.eval_set
        seen = frozenset({it.path for it in es.items} | {m["path"] for m in es.missing} | set(data.calib_paths))
        left = sum(str(images_dir / i["file_name"]) not in seen for i in load_annotations(ann)["images"])
        if left == 0:
            return None
        eval_set = prepare_eval_set(listing, images_dir, ann, num_images, exclude=seen)
        what = f"{images_dir}: {min(left, num_images)} annotated images neither evaluated nor calibrated on by the search"
    return dataclasses.replace(data, eval_set=eval_set, description=what)
