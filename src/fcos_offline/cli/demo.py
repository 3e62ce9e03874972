"""CLI verbs of the demo stage: ``make-demo-data`` and ``train-demo``."""

from __future__ import annotations

import argparse

from fcos_offline.cli.common import (
    BATCH,
    COUNT,
    POSITIVE_INT,
    SIDE,
    THREADS,
    add_flag,
    number,
)
from fcos_offline.errors import EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``make-demo-data`` and ``train-demo`` verbs."""
    m = sub.add_parser(
        "make-demo-data",
        help="write a synthetic COCO-format shapes dataset (the demo's data)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write <OUT>/<SPLIT>2017/<12-digit id>.jpg|.png and\n"
            "<OUT>/annotations/instances_<SPLIT>2017.json: coloured shapes (circle, square,\n"
            "triangle, star, ring, cross) on textured backgrounds, 200-640 px images (portrait and\n"
            "landscape, some grayscale, some PNG), objects 8 px to most of the image, overlapping.\n"
            "The same seed gives byte-identical files; use different seeds for train and val.\n\n"
            "example:\n"
            "  fcos-offline make-demo-data --out demo_coco --split val --num-images 100 --seed 1000"
        ),
    )
    add_flag(m, "--out", required=True, metavar="DIR", help="dataset root (created if missing)")
    add_flag(m, "--split", default="val", help="split name: images go to <split>2017/ (default val)")
    add_flag(m, "--num-images", type=number(int, 1, 1_000_000), default=100, metavar="N", help="number of images (default 100)")
    add_flag(m, "--seed", type=COUNT, default=1000, help="random seed (default 1000, the demo's val seed)")
    m.set_defaults(func=_make_demo_data)

    t = sub.add_parser(
        "train-demo",
        help="train the small demo FCOS on synthetic shapes (CPU) and save it in mmdet layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train the demo FCOS (this project's FCOS at reduced width/depth) on a synthetic\n"
            "train split (rendered in memory), re-estimate BatchNorm statistics, save {'state_dict', 'meta'}\n"
            "in mmdet layout, reload it through the normal checkpoint loader (outputs must be\n"
            "identical) and report COCO bbox mAP on a synthetic val split.\n\n"
            "example (how src/fcos_offline/assets/fcos_demo.pth was made, see demo/README.md):\n"
            "  fcos-offline train-demo --out src/fcos_offline/assets/fcos_demo.pth"
        ),
    )
    add_flag(t, "--out", required=True, metavar="PATH", help="checkpoint to write (.pth)")
    add_flag(t, "--iters", type=POSITIVE_INT, default=3200, metavar="N", help="optimizer steps (default 3200)")
    add_flag(t, "--batch-size", type=BATCH, default=4, metavar="N", help="images per step (default 4)")
    add_flag(t, "--train-images", type=POSITIVE_INT, default=1600, metavar="N", help="train split size (default 1600)")
    add_flag(t, "--lr", type=number(float, 0.0, 1.0, low_open=True), default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    add_flag(t, "--seed", type=COUNT, default=0, help="train split seed and weight-init seed (default 0)")
    add_flag(t, "--val-seed", type=COUNT, default=1000, help="val split seed (default 1000)")
    add_flag(t, "--val-images", type=POSITIVE_INT, default=100, metavar="N", help="val images (default 100)")
    add_flag(t, "--val-dir", metavar="DIR", help="keep the val split here (default: a temporary folder)")
    add_flag(t, "--model-input-height", type=SIDE, default=320, metavar="H", help="canvas height (default 320)")
    add_flag(t, "--model-input-width", type=SIDE, default=512, metavar="W", help="canvas width (default 512)")
    add_flag(
        t, "--threads", type=THREADS, default=1, help="torch threads (default 1: on a busy 2-core machine two OpenMP threads spin-wait on each other)"
    )
    t.set_defaults(func=_train_demo)


def _make_demo_data(args: argparse.Namespace) -> int:
    from fcos_offline.demo.synthetic import make_demo_data

    summary = make_demo_data(args.out, split=args.split, num_images=args.num_images, seed=args.seed)
    print(
        f"wrote {summary['num_images']} images ({summary['num_annotations']} objects) to {summary['image_dir']} "
        f"and {summary['ann_file']} in {summary['seconds']:.1f} s"
    )
    return EXIT_OK


def _train_demo(args: argparse.Namespace) -> int:
    from fcos_offline.demo.train import train_demo
    from fcos_offline.evaluate.coco import STAT_NAMES

    if args.seed == args.val_seed:
        raise UsageError("--seed and --val-seed must differ (train and val images would be the same)")
    result = train_demo(
        args.out,
        iters=args.iters,
        batch_size=args.batch_size,
        train_images=args.train_images,
        lr=args.lr,
        seed=args.seed,
        val_seed=args.val_seed,
        val_images=args.val_images,
        val_dir=args.val_dir,
        canvas_hw=(args.model_input_height, args.model_input_width),
        threads=args.threads,
    )
    stats = result["eval"]["stats"]
    print(f"saved {result['out']} after {result['iters']} steps ({result['images_seen']} images) in {result['train_seconds'] / 60:.1f} min")
    print("bbox " + "  ".join(f"{n} {v:.3f}" for n, v in zip(STAT_NAMES, stats)))
    return EXIT_OK
