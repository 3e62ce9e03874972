"""Reliability: bad tensors, .info lists, dumps and annotation files through infer, postprocess, run and tune.

Decisions (docs/reliability.md):

* a ``.bin`` of the wrong size or holding NaN/inf, and an ``.info`` line whose file does not exist:
  that input is skipped with one line, listed in summary.json, exit 3;
* an ``.info`` line with a missing field: exit 1 naming ``file:line`` — the list itself is corrupt
  and guessing which images were meant would evaluate a different set;
* a dump holding NaN/inf: that image is skipped ("dets hold N NaN/inf value(s)"), listed in
  summary.json 'skipped', the rest is evaluated, exit 3;
* an annotated image without a file (run) / without dumps (postprocess): evaluated as an image
  without detections, named in a warning and listed (report.json 'missing_images', summary.json
  'missing_dump_files'), exit 3;
* a category the model does not know: a warning naming the annotation file and the category; COCO
  rules apply (its ground truth counts as missed), exit 0;
* an empty annotations list: a warning, mAP is -1 (COCO's "no ground truth"), detections are still
  written to bbox_results.json (e.g. for a test-dev submission), exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from badinputs import (
    CANVAS,
    ann_empty_annotations,
    ann_image_without_file,
    ann_unknown_category,
    annotation_json,
    assert_clean,
    cli,
    good_jpeg,
    image_sizes,
    info_missing_field,
    info_missing_path,
    nonfinite_dump,
    record,
    reliability_log,  # noqa: F401 - session fixture writing the reliability table
    tiny,  # noqa: F401 - session fixture: the tiny model
    tune_outcome,
    write_json,
    wrong_size_bin,
)

from fcos_offline.data.info import make_info
from fcos_offline.data.preprocess import preprocess_folder

H, W = CANVAS


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory) -> SimpleNamespace:
    """Four good images, their annotations, .bin tensors, both .info lists and ONNX Runtime dumps."""
    root = tmp_path_factory.mktemp("files")
    images = root / "images"
    images.mkdir()
    paths = [good_jpeg(images, f"im{i}.jpg", seed=300 + i, h=60 + 8 * i, w=90) for i in range(4)]
    ann = annotation_json(image_sizes(paths))
    bins = root / "bins"
    preprocess_folder(images, bins, H, W, workers=1)
    bin_info, jpg_info = root / "fcos.info", root / "fcos_jpeg.info"
    make_info("bin", bins, bin_info, width=W, height=H)
    make_info("jpg", images, jpg_info, workers=1)
    from fcos_offline.cli import main

    dumps = root / "dumps"
    assert main(["infer", "--model", str(tiny.onnx), "--input-info", str(bin_info), "--output", str(dumps)]) == 0
    return SimpleNamespace(
        root=root,
        images=images,
        paths=paths,
        ann=ann,
        ann_file=write_json(root / "instances.json", ann),
        bins=bins,
        bin_info=bin_info,
        jpg_info=jpg_info,
        dumps=dumps,
        bin_lines=bin_info.read_text().splitlines(),
        jpg_lines=jpg_info.read_text().splitlines(),
    )


def _copy_dumps(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.glob("*.bin"):
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _postprocess(capsys, dumps: Path, info: Path, ann: Path, out: Path, *extra) -> tuple[int, str, str, dict]:
    code, o, e = cli(
        capsys,
        "postprocess",
        "--bin-data-path",
        dumps,
        "--test-annotation",
        info,
        "--det-results-path",
        out,
        "--annotations-path",
        ann,
        "--net-input-height",
        H,
        "--net-input-width",
        W,
        *extra,
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return code, o, e, summary


# --------------------------------------------------------------------------- tensors and .info lists


def test_infer_skips_a_bin_of_the_wrong_size(data, tiny, tmp_path, capsys) -> None:
    bad = wrong_size_bin(tmp_path)
    info = tmp_path / "mixed.info"
    info.write_text("\n".join([*data.bin_lines, f"4 {bad} {W} {H}"]) + "\n")
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "o")
    assert_clean(code, out, err, 3, bad.name)
    line = record(".bin of the wrong size", "infer", code, err, "skipped with a warning, listed in summary.json", bad.name)
    assert "1000 bytes, expected 294912" in line
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["num_inferred"] == 4


def test_infer_skips_a_bin_holding_nan(data, tiny, tmp_path, capsys) -> None:
    bad = tmp_path / "nan.bin"
    tensor = np.fromfile(data.bins / "im0.bin", np.float32)
    tensor[::1000] = np.nan
    tensor[5] = np.inf
    tensor.tofile(bad)
    info = tmp_path / "mixed.info"
    info.write_text("\n".join([*data.bin_lines, f"4 {bad} {W} {H}"]) + "\n")
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "o")
    assert_clean(code, out, err, 3, bad.name)
    line = record(
        ".bin holding NaN/inf",
        "infer",
        code,
        err,
        "skipped with a warning (the engine would turn it into NaN detections), listed in summary.json",
        bad.name,
    )
    assert "NaN/inf" in line and not (tmp_path / "o" / "nan_1.bin").exists()


def test_info_line_with_a_missing_field(data, tiny, tmp_path, capsys) -> None:
    for verb, lines in (("infer", data.bin_lines), ("postprocess", data.jpg_lines)):
        info = info_missing_field(tmp_path / f"{verb}.info", lines)
        if verb == "infer":
            code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "o")
        else:
            code, out, err, _ = _postprocess(capsys, data.dumps, info, data.ann_file, tmp_path / "pp")
        assert_clean(code, out, err, 1, f"{info.name}:3")
        line = record(".info line with a missing field", verb, code, err, "refused before any work: the list is corrupt (names file:line)", info.name)
        assert "expected '<index> <path> <width> <height>'" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "pp").exists()


def test_info_line_naming_a_missing_file(data, tiny, tmp_path, capsys) -> None:
    gone = tmp_path / "gone.bin"
    info = info_missing_path(tmp_path / "bin.info", data.bin_lines, gone)
    code, out, err = cli(capsys, "infer", "--model", tiny.onnx, "--input-info", info, "--output", tmp_path / "o")
    assert_clean(code, out, err, 3, gone.name)
    record(".info line naming a missing file", "infer", code, err, "skipped with a warning, listed in summary.json", gone.name)
    # postprocess takes only the sizes from a jpg-mode list; it opens the image only to draw it
    gone_jpg = tmp_path / "im9.jpg"
    info = info_missing_path(tmp_path / "jpg.info", data.jpg_lines, gone_jpg)
    dumps = _copy_dumps(data.dumps, tmp_path / "dumps")
    (dumps / "im9_1.bin").write_bytes((dumps / "im0_1.bin").read_bytes())
    (dumps / "im9_2.bin").write_bytes((dumps / "im0_2.bin").read_bytes())
    ann = ann_image_without_file(data.ann, "im9.jpg")
    code, out, err, summary = _postprocess(capsys, dumps, info, write_json(tmp_path / "ann.json", ann), tmp_path / "pp", "--ifShowDetObj")
    assert_clean(code, out, err, 3, gone_jpg.name)
    record(
        ".info line naming a missing file",
        "postprocess",
        code,
        out + err,
        "evaluated with the listed size; drawing it is skipped and listed (--ifShowDetObj)",
        gone_jpg.name,
    )
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["im9.jpg"] and summary["missing_dumps"] == 0


# --------------------------------------------------------------------------- dumps


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["NaN", "inf"])
def test_postprocess_skips_a_dump_holding_nonfinite_values(value, data, tmp_path, capsys) -> None:
    dumps = _copy_dumps(data.dumps, tmp_path / "dumps")
    _, dets_path = nonfinite_dump(dumps, "im2", value)
    code, out, err, summary = _postprocess(capsys, dumps, data.jpg_info, data.ann_file, tmp_path / "pp")
    assert_clean(code, out, err, 3, dets_path.name)
    case = f"dump holding {'NaN' if value != value else 'inf'}"
    line = record(
        case,
        "postprocess",
        code,
        out + err,
        "that image skipped, listed in summary.json 'skipped' and evaluated as without detections; the rest evaluated",
        dets_path.name,
    )
    assert "NaN/inf" in line
    assert [Path(s["path"]).name for s in summary["skipped"]] == [dets_path.name]
    results = json.loads((tmp_path / "pp" / "bbox_results.json").read_text())  # valid JSON: no NaN written
    assert results and {r["image_id"] for r in results} <= {1, 2, 4}
    assert summary["missing_dumps"] == 1 and 0.0 <= summary["bbox_mAP"] <= 1.0


# --------------------------------------------------------------------------- annotation files


def _ann_case(data, kind: str) -> tuple[str, dict]:
    if kind == "image id without a file":
        return kind, ann_image_without_file(data.ann)
    if kind == "category the model does not know":
        return kind, ann_unknown_category(data.ann)
    return kind, ann_empty_annotations(data.ann)


ANN_CASES = ["image id without a file", "category the model does not know", "empty annotations list"]


@pytest.mark.parametrize("kind", ANN_CASES)
def test_postprocess_meets_an_unusual_annotation_file(kind, data, tmp_path, capsys) -> None:
    case, ann = _ann_case(data, kind)
    ann_file = write_json(tmp_path / "instances.json", ann)
    code, out, err, summary = _postprocess(capsys, data.dumps, data.jpg_info, ann_file, tmp_path / "pp")
    results = json.loads((tmp_path / "pp" / "bbox_results.json").read_text())
    assert results
    if kind == "image id without a file":
        assert_clean(code, out, err, 3, "no_such_image.jpg")
        line = record(
            case,
            "postprocess",
            code,
            err,
            "evaluated as an image without detections; warning names it, summary.json 'missing_dump_files' lists it",
            "no_such_image.jpg",
        )
        assert summary["missing_dump_files"] == ["no_such_image.jpg"]
    elif kind == "category the model does not know":
        assert_clean(code, out, err, 0, "unicorn", ann_file.name)
        line = record(case, "postprocess", code, err, "warning names the file and category; COCO rules: its ground truth counts as missed", "unicorn")
        assert {c["name"]: c["AP"] for c in summary["classwise"]}["unicorn"] == 0.0
    else:
        assert_clean(code, out, err, 0, ann_file.name)
        line = record(
            case, "postprocess", code, err, "warning; mAP -1 (no ground truth), detections still written to bbox_results.json", "no annotations"
        )
        assert summary["bbox_mAP"] == -1.0
    assert line


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory) -> Path:
    """One work folder for the three annotation runs: the export and the dumps are reused."""
    return tmp_path_factory.mktemp("ann_runs") / "work"


@pytest.mark.parametrize("kind", ANN_CASES)
def test_run_meets_an_unusual_annotation_file(kind, data, tiny, run_workdir, tmp_path, capsys) -> None:
    case, ann = _ann_case(data, kind)
    ann_file = write_json(tmp_path / "instances.json", ann)
    code, out, err = cli(
        capsys,
        "run",
        "--checkpoint",
        tiny.ckpt,
        "--images",
        data.images,
        "--annotations",
        ann_file,
        "--shape",
        H,
        W,
        "--batch-sizes",
        1,
        "--engines",
        "onnxruntime",
        "--no-online",
        "--workdir",
        run_workdir,
    )
    report = json.loads((run_workdir / "report.json").read_text())
    if kind == "image id without a file":
        assert_clean(code, out, err, 3, "no_such_image.jpg")
        record(
            case, "run", code, err, "warning names it; evaluated as without detections; report.json 'missing_images' lists it", "no_such_image.jpg"
        )
        assert [Path(p).name for p in report["missing_images"]] == ["no_such_image.jpg"]
    elif kind == "category the model does not know":
        assert_clean(code, out, err, 0, "unicorn")
        record(case, "run", code, err, "warning names the file and category; evaluated by COCO rules", "unicorn")
    else:
        assert_clean(code, out, err, 0, "no annotations")
        record(case, "run", code, err, "warning; mAP -1 in the report (no ground truth)", "no annotations")
        assert report["entries"][0]["bbox_mAP"] == -1.0
    skipped = [Path(s["path"]).name for s in report["entries"][0]["skipped"]]
    assert report["entries"][0]["num_images"] == 4
    assert skipped == (["no_such_image.jpg"] if kind == "image id without a file" else [])  # listed in every configuration


@pytest.mark.parametrize("kind", ANN_CASES)
def test_tune_meets_an_unusual_annotation_file(kind, data, tiny, tmp_path, capsys) -> None:
    """Observed behaviour of tune (owned by the tune author), recorded for the table."""
    case, ann = _ann_case(data, kind)
    ann_file = write_json(tmp_path / "instances.json", ann)
    code, out, err = cli(
        capsys,
        "tune",
        "--model",
        tiny.onnx,
        "--images",
        data.images,
        "--annotations",
        ann_file,
        "--output",
        tmp_path / "tuned",
        "--engines",
        "onnxruntime",
        "--calib-methods",
        "minmax",
        "--eval-images",
        5,
        "--calib-images",
        2,
        "--threads",
        1,
        "--bench-runs",
        1,
        "--bench-seconds",
        1,
        "--no-fallback",
        "--no-sweep",
        "--time-budget",
        1,
    )
    assert code in (0, 1, 3) and "Traceback" not in out + err, err[-3000:]
    needle = {"image id without a file": "no_such_image.jpg", "category the model does not know": "unicorn"}.get(kind, "annotations")
    behaviour = tune_outcome(code, out)
    line = record(case, "tune", code, err, behaviour, needle)
    if not line:
        record(
            case,
            "tune",
            code,
            err,
            f"{behaviour}; no line names {needle} (the image is silently left out of the evaluation set): reported to the tune author",
            needle,
        )
        pytest.xfail(f"tune gives no line naming {needle!r} for '{case}' (reported to the tune author)")


def test_an_output_that_is_a_pipe_is_written_not_replaced(data, tmp_path) -> None:
    """get-info to a named pipe (or /dev/stdout): the lines go through it; the pipe is not renamed over."""
    import os
    import stat
    import threading

    from fcos_offline.cli import main

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_bytes()), daemon=True)
    reader.start()
    assert main(["get-info", "jpg", str(data.images), str(pipe)]) == 0
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert got and got[0].decode().count("\n") == len(list(data.images.iterdir()))
