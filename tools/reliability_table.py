#!/usr/bin/env python3
"""Render docs/reliability.md from the observations the reliability tests record.

The tests (tests/reliability/, and the artifact and checkpoint tests that import its log) record, for every bad input or fault and every verb that
meets it, the exit code, the line the verb printed about it and the behaviour the test checked.
Regenerate the JSON and this page with::

    FCOS_WRITE_RELIABILITY=1 python -m pytest tests/reliability/ tests/engine/test_inductor.py tests/engine/test_artifact_files.py tests/model/test_checkpoint.py

(which writes docs/reliability.json and runs this script), or render an existing JSON file::

    python tools/reliability_table.py [docs/reliability.json] [-o docs/reliability.md]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the order of the table (cases not listed here follow, alphabetically)
GROUPS: OrderedDict[str, list[str]] = OrderedDict(
    [
        (
            "Images",
            [
                "0-byte file",
                "truncated JPEG",
                "text file named .jpg",
                "PNG with alpha",
                "16-bit PNG",
                "grayscale JPEG",
                "CMYK JPEG",
                "EXIF-rotated JPEG",
                "1x1 image",
                "10000x100 image",
            ],
        ),
        (
            "Tensors and .info lists",
            [".bin of the wrong size", ".bin holding NaN/inf", ".info line with a missing field", ".info line naming a missing file"],
        ),
        ("Dumps", ["dump holding NaN", "dump holding inf"]),
        ("Annotation files", ["image id without a file", "category the model does not know", "empty annotations list"]),
        ("Checkpoints", ["plain ResNet checkpoint", "pickle that runs code when loaded", "0-byte checkpoint"]),
        ("ONNX files", ["ONNX with other input/output names", "ONNX that is not a detector", "0-byte ONNX"]),
        (
            "Faults",
            [
                "kill -9 during run (then the same --workdir again)",
                "full disk (real tmpfs)",
                "full disk (injected ENOSPC)",
                "second run on a busy --workdir",
            ],
        ),
        (
            "1. Stale reuse (a reused work folder after a change)",
            [
                "reused --workdir after a change of canvas",
                "reused --workdir after a change of image set",
                "reused --workdir after a change of score threshold",
                "checkpoint rewritten in place",
                "infer --resume on another model's dumps",
            ],
        ),
        (
            "2. Dumps of any number of detections",
            [
                "dumps of 50 detections per image (recipe naming, .bin)",
                "dumps of 5000 detections per image (recipe naming, .bin)",
                "dumps of 50 detections per image (ais_bench naming, .bin)",
                "dumps of 7 detections per image (recipe naming, .npy)",
                "run --max-per-img 50",
            ],
        ),
        (
            "3. Vacuous verification",
            [
                "checkpoint with NaN weights",
                "checkpoint with inf weights",
                "checkpoint with integer weights",
                "model without detections on the sample input",
            ],
        ),
        (
            "4. Annotations taken on trust",
            [
                "X.jpg and X.png in one set",
                "repeated annotation id",
                "box of negative size",
                "annotation of an unlisted image",
                "postprocess without the canvas of a 128x192 run",
                "postprocess with a canvas other than the dumps'",
            ],
        ),
        ("5. Skips reported in every mode", ["0-byte image with run --write-bins"]),
        (
            "6.-10. Crashes, hangs and blow-ups",
            [
                "export --batch-size 0",
                "/dev/zero as the perf file",
                "/dev/zero as the annotation file",
                "/dev/zero as the .info file",
                "infer --threads 1000 --batch-size 1000 on 3 images",
                "run --batch-sizes 1000 on 3 images",
                "tune --engines onnxruntime on a fresh output folder",
                "PNG declaring 32000x32000 pixels",
                "model declaring a 100000x100000 input",
            ],
        ),
        (
            "11. Numeric flags (every one is range-checked; tests enumerate the parsers)",
            ["export --shape 0", "export --opset 99", "run --num-images -1", "run --num-images 0", "parse --chips -4"],
        ),
        ("12. Nothing written outside the output", ["make-demo-data --split ../../x", "failed export onto an existing model"]),
        (
            "13.-15. Checkpoints and files",
            [
                "torchvision checkpoint with num_batches_tracked",
                "checkpoint meta holding a frozenset",
                "checkpoint meta holding a range",
                "checkpoint meta holding a slice",
                "checkpoint meta holding a defaultdict",
                "artifact.json: truncated JSON",
                "artifact.json: list instead of object",
                "artifact.json: model_file outside the folder",
                "empty .info",
                "dangling symlink in an image folder",
                "symlink loop in an image folder",
                "file name with a line break",
                "Ctrl-C during streaming infer",
            ],
        ),
        (
            "Fuzzed parsers (hypothesis)",
            [
                ".info file (fuzzed bytes)",
                "dump folder (fuzzed names and bytes)",
                "perf file (fuzzed)",
                "summary.json (fuzzed)",
                "annotation JSON (fuzzed and mutated)",
            ],
        ),
    ]
)
VERBS = ["preprocess", "get-info", "infer", "infer --engine openvino", "postprocess", "inspect", "export", "convert", "run", "tune", "parse"]
EXIT = {0: "0 ok", 1: "1 failed", 2: "2 usage", 3: "3 skips"}

PREAMBLE = """# Reliability: bad inputs, faults and untrusted files

Generated by `tools/reliability_table.py` from `docs/reliability.json`, which the reliability
tests (`tests/reliability/` and the artifact and checkpoint tests; corpus builders in `tests/badinputs.py`) write when run with
`FCOS_WRITE_RELIABILITY=1`. Do not edit by hand: rerun
`FCOS_WRITE_RELIABILITY=1 python -m pytest tests/reliability/ tests/engine/test_inductor.py tests/engine/test_artifact_files.py tests/model/test_checkpoint.py`
(without `-n`: one process merges the log).

Every verb ends with a documented exit code: **0** ok, **1** failed, **2** usage error, **3**
completed but some inputs were skipped (each named in one line and listed in the verb's
summary: stdout for `preprocess`/`get-info`, `summary.json` for `infer`/`postprocess`,
`report.json` for `run`). No Python traceback reaches the user unless `--debug` is given.

Decisions:

- **Broken images** (empty, truncated, not an image) are skipped and listed; **valid but unusual
  images** (alpha, 16-bit, gray, CMYK, EXIF orientation, 1x1, extreme aspect) are processed exactly
  like `cv2.imread(IMREAD_COLOR)` + the recipe letterbox. An image too thin to keep one row on the
  canvas is skipped.
- **NaN/inf**: a dump holding NaN/inf is skipped for that image (it counts as an image without
  detections), exit 3; an input `.bin` holding NaN/inf is skipped by `infer` before the engine.
- **A malformed `.info` line** fails the verb (exit 1, `file:line`): the list is corrupt and
  guessing would evaluate another set. A line naming a missing file is skipped (exit 3).
- **Annotation files** are checked on load (ids, file names, 4-number boxes…): a malformed one is
  one line naming the file and the entry. A category the model cannot predict and an empty
  annotations list are warnings (exit 0): COCO rules apply, mAP is -1 when there is no ground truth,
  and detections are still written. An annotated image without a file is evaluated as an image
  without detections, named and listed, exit 3.
- **Checkpoints** load with `weights_only`; a pickle naming a code-running callable is refused
  (never executed); a foreign state dict is "not an FCOS checkpoint", naming the file. Settings
  read from a checkpoint's `meta` or an artifact's `artifact.json` have the flags' ranges (one
  table), refused naming the file and the key.
- **Artifacts** are data: `artifact.json` records the sha256 of every file; a changed, missing,
  added or linked file is refused naming it. An inductor artifact is weights loaded with
  `weights_only` plus a config (no `torch.export` pickle); its compile cache lives in this user's
  own 0700 folder, keyed by the weights' digest, never in a folder someone handed over. A planted
  pickle, `.py` or `.so` never runs, even with the digests rewritten.
- **ONNX with other names**: accepted when it has one float `[B,3,H,W]` input (fed by position)
  and two outputs told apart by type — float rank 3 with last dimension 5 (dets) and integer rank 2
  (labels) — whatever their names and order; anything else is refused naming the file and its
  outputs.
- **Full disk**: "disk full while writing FILE", exit 1; every output is written through a
  temporary name and renamed, so files written before are whole and no partial file stays;
  `infer --resume` / `run` on the same `--workdir` completes later with the uninterrupted results.
- **kill -9**: the same atomic writes mean no torn file; `run` reuses finished steps (export stamp,
  complete dumps) and a stale lock of a dead process is taken over.
- **One writer per output**: `run`, `infer` (local or Ray), `compare`, `tune`, `convert`,
  `preprocess` and `postprocess` hold a kernel lock on their output folder; a second writer is
  refused naming the holder's pid, and a killed holder's lock is free at once.
- **Outputs never overlap inputs** (resolved paths, links followed): an output that is, holds or
  (for verbs that clear it) lies inside an input is refused in one line, exit 2, before anything
  is written; nothing outside the output is ever removed.
- **Reuse is keyed, never assumed**: the export cache by the checkpoint's bytes, canvas and model
  settings; each configuration's dumps in `run` by the model bytes, engine options, canvas and the
  exact image list; `infer --resume` by the engine's output key (model bytes, engine, precision,
  canvas, settings) — resuming on another key is refused; `tune` trials by the model, data and
  calibration digests. A change recomputes and says so.
- **Dumps of any K** detections per image are read: the labels/dets pair's sizes (8K and 20K
  bytes) tell K. **Postprocess** takes the canvas infer recorded in the dumps' `summary.json` and
  refuses a contradicting one; without that record (a killed infer) it needs the canvas flags.
- **Weights** with NaN/inf or of an integer type are refused naming the tensors; export also
  compares every raw head output with PyTorch numerically (detection matching alone can pass
  vacuously).
- **Annotations**: two images with one file stem (`X.jpg`, `X.png`), repeated annotation ids and
  boxes of negative size are errors; annotations of unlisted images a warning. In `run` and `tune`
  an annotated image that is missing or does not decode is named, skipped, listed (every entry's
  `skipped` in report.json) and exits 3; it counts as an image without detections.
- **Bounds**: every text/JSON input is read with a size bound and devices/pipes are refused at
  once (a named pipe anywhere, an image folder included, never blocks); images
  over 200 megapixels (`FCOS_OFFLINE_MAX_PIXELS`) are skipped before decoding; model canvases over
  16384 per side or 64 megapixels are refused; threads and decode workers are capped to the cores
  and batches to the images present (a warning says so); every numeric flag has a range (one usage
  line, exit 2); a warning repeated more than 20 times is counted, not printed.
- **Corrupt JPEG data** that libjpeg decodes with a warning (bit rot, a cut file with a fake end
  marker) is a named skip (exit 3), not a silently wrong image.
- **Ray**: the cluster is named in the first line; a pool the cluster cannot hold is refused
  before starting, a stalled start ends in one line, and a worker's error is the local run's line.
- **Nothing outside the output**: split names are plain names; export writes a temporary file and
  replaces the target only after verification. Ctrl-C stops with one line (workers ignore SIGINT).
"""


def _order(records: list[dict]) -> list[tuple[str, list[dict]]]:
    by_case: dict[str, list[dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], []).append(r)
    known = [c for cases in GROUPS.values() for c in cases]
    out = []
    for group, cases in GROUPS.items():
        rows = [r for c in cases for r in sorted(by_case.get(c, []), key=lambda r: _verb_key(r["verb"]))]
        if rows:
            out.append((group, rows))
    rest = sorted(c for c in by_case if c not in known)
    if rest:
        out.append(("Other", [r for c in rest for r in sorted(by_case[c], key=lambda r: _verb_key(r["verb"]))]))
    return out


def _verb_key(verb: str) -> tuple[int, str]:
    return (VERBS.index(verb) if verb in VERBS else len(VERBS), verb)


def _code(code: int | None) -> str:
    return "fuzzed" if code is None else str(code)


def _cell(text: str, limit: int = 170) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"`{text}`" if text else "—"


def render(records: list[dict]) -> str:
    lines = [
        PREAMBLE,
        "## Matrix (exit codes)",
        "",
        "An empty cell: the verb does not meet that input. `fuzzed`: the verb's parser was fuzzed directly.",
        "",
    ]
    used_verbs = [v for v in VERBS if any(r["verb"] == v for r in records)]
    used_verbs += sorted({r["verb"] for r in records} - set(used_verbs))
    lines.append("| bad input / fault | " + " | ".join(used_verbs) + " |")
    lines.append("|---|" + "---|" * len(used_verbs))
    for group, rows in _order(records):
        lines.append(f"| **{group}** |" + " |" * len(used_verbs))
        cases: dict[str, dict[str, int]] = {}
        for r in rows:
            cases.setdefault(r["case"], {})[r["verb"]] = r["exit_code"]
        for case, codes in cases.items():
            lines.append(f"| {case} | " + " | ".join(_code(codes[v]) if v in codes else "" for v in used_verbs) + " |")
    lines += ["", "## Observed behaviour", "", "The line is the first one the verb printed about the case (paths shortened to `…/`).", ""]
    for group, rows in _order(records):
        lines += [f"### {group}", "", "| bad input / fault | verb | exit | behaviour | line | test |", "|---|---|---|---|---|---|"]
        for r in rows:
            test = r.get("test", "").split("::")[-1]
            code = "— (fuzzed)" if r["exit_code"] is None else EXIT.get(r["exit_code"], r["exit_code"])
            lines.append(f"| {r['case']} | {r['verb']} | {code} | {r['behaviour']} | {_cell(r['line'])} | {test} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default=str(ROOT / "docs" / "reliability.json"), help="observations (JSON list)")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "reliability.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    records = json.loads(Path(args.json).read_text())
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(records))
    print(f"wrote {out} ({len(records)} observations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
