"""postprocess end to end on synthetic dumps made from the sample's ground truth."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE, needs_sample

from fcos_offline.cli import main
from fcos_offline.data.annotations import COCO80_CATEGORY_IDS, COCO80_NAMES
from fcos_offline.data.dumps import write_dumps
from fcos_offline.data.info import make_info
from fcos_offline.data.letterbox import boxes_to_canvas, letterbox_for
from fcos_offline.errors import FcosError
from fcos_offline.evaluate.postprocess import postprocess

pytestmark = needs_sample
CANVAS_H, CANVAS_W = 800, 1333


def _ground_truth() -> dict:
    return json.loads((SAMPLE / "annotations" / "instances_val2017_sample.json").read_text())


def _perfect_dumps(dump_dir: Path, data: dict) -> dict[str, np.ndarray]:
    """GT boxes forward-mapped into the canvas, as an engine would dump them. Half the images use
    ais_bench's 0-based naming. Returns the GT xyxy boxes per stem."""
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    gt_xyxy = {}
    for i, img in enumerate(sorted(data["images"], key=lambda im: im["id"])):
        stem = Path(img["file_name"]).stem
        anns = by_image.get(img["id"], [])
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64).reshape(-1, 4)
        lb = letterbox_for(img["width"], img["height"], CANVAS_H, CANVAS_W)
        labels = np.full(100, -1, np.int64)
        dets = np.zeros((100, 5), np.float32)
        labels[: len(anns)] = [COCO80_CATEGORY_IDS.index(a["category_id"]) for a in anns]
        dets[: len(anns), :4] = boxes_to_canvas(xyxy, lb)
        dets[: len(anns), 4] = np.linspace(1.0, 0.5, len(anns))
        if i % 2:
            labels.tofile(dump_dir / f"{stem}_0.bin")
            dets.tofile(dump_dir / f"{stem}_1.bin")
        else:
            write_dumps(dump_dir, stem, labels, dets)
        gt_xyxy[stem] = xyxy
    return gt_xyxy


@pytest.fixture()
def setup(tmp_path):
    data = _ground_truth()
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    gt_xyxy = _perfect_dumps(dumps, data)
    info = tmp_path / "fcos_jpeg.info"
    make_info("jpg", SAMPLE / "val2017", info, workers=1)
    return tmp_path, dumps, info, data, gt_xyxy


def test_perfect_dumps_give_map_one(setup, capsys):
    tmp_path, dumps, info, data, gt_xyxy = setup
    out = tmp_path / "ret"
    code = main(
        [
            "postprocess",
            f"--bin_data_path={dumps}/",
            f"--test_annotation={info}",
            f"--det_results_path={out}/",
            f"--net_input_height={CANVAS_H}",
            f"--net_input_width={CANVAS_W}",
            "--ifShowDetObj",
            "--annotations_path",
            str(SAMPLE / "annotations"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    # people read percent (the class table and the headline, as run and tune print them); JSON keeps fractions
    assert "bbox AP 100.0  AP50 100.0" in printed and "(percent; summary.json holds fractions)" in printed
    assert "AP %" in printed and "(fractions)" not in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"):
        assert key in summary
    assert summary["bbox_mAP"] == pytest.approx(1.0, abs=1e-9)
    assert summary["bbox_mAP_50"] == pytest.approx(1.0, abs=1e-9)
    assert len(summary["stats"]) == 12
    assert summary["num_images"] == 10 and summary["missing_dumps"] == 0 and summary["skipped"] == []
    assert {row["category_id"] for row in summary["classwise"]} == {c["id"] for c in data["categories"]}
    assert all(row["AP"] == pytest.approx(1.0) for row in summary["classwise"])
    assert "class-wise bbox AP" in printed and "fire hydrant" in printed and "AP50 100.0" in printed

    results = json.loads((out / "bbox_results.json").read_text())
    assert len(results) == len(data["annotations"])
    curves = json.loads((out / "pr_curves.json").read_text())
    assert len(curves["recall"]) == 101

    for img in data["images"]:
        stem = Path(img["file_name"]).stem
        lines = (out / f"{stem}.txt").read_text().splitlines()
        assert len(lines) == len(gt_xyxy[stem])
        parsed = [line.split(" ") for line in lines]
        assert all(len(fields) == 6 for fields in parsed)
        assert all(fields[0] in {n.replace(" ", "_") for n in COCO80_NAMES} for fields in parsed)
        boxes = np.array([[float(v) for v in fields[2:]] for fields in parsed]).reshape(-1, 4)
        np.testing.assert_allclose(boxes, gt_xyxy[stem], atol=0.006)  # 2 decimals in the file
        vis = cv2.imread(str(out / "vis" / f"{stem}.jpg"))
        assert vis is not None and vis.shape[:2] == (img["height"], img["width"])


def test_recipe_pad_rule_is_close_but_not_exact(setup):
    tmp_path, dumps, info, data, _ = setup
    exact = postprocess(dumps, info, tmp_path / "a", SAMPLE / "annotations", CANVAS_H, CANVAS_W, net_out_num=None)
    recipe = postprocess(dumps, info, tmp_path / "b", SAMPLE / "annotations", CANVAS_H, CANVAS_W, pad_rule="recipe")
    assert recipe["bbox_mAP_50"] == pytest.approx(1.0)
    assert 0.8 < recipe["bbox_mAP"] <= exact["bbox_mAP"]
    exact_boxes = [r["bbox"] for r in json.loads((tmp_path / "a" / "bbox_results.json").read_text())]
    recipe_boxes = [r["bbox"] for r in json.loads((tmp_path / "b" / "bbox_results.json").read_text())]
    diff = np.abs(np.array(exact_boxes) - np.array(recipe_boxes))
    assert diff.max() > 0.01  # the formulas really differ ...
    assert diff.max() < 2.0  # ... by less than 1/s px per coordinate (x, y) and 2/s per size (w, h)
    assert not (tmp_path / "a" / "vis").exists()


def test_exact_rule_clips_to_the_image_recipe_rule_does_not(setup):
    """A box reaching into the letterbox's side band: the default clips it to the image; the
    recipe's rule keeps it outside, as fcos_pth_postprocess.py does (spec §9: no clipping)."""
    tmp_path, dumps, info, data, _ = setup
    img = next(im for im in data["images"] if im["width"] > im["height"])  # side bands left and right
    stem = Path(img["file_name"]).stem
    lb = letterbox_for(img["width"], img["height"], CANVAS_H, CANVAS_W)
    labels = np.full(100, -1, np.int64)
    dets = np.zeros((100, 5), np.float32)
    labels[0], dets[0] = 0, [lb.pad_left - 30, 100, CANVAS_W - lb.pad_left + 30, 300, 0.9]  # 30 px into each band
    for path in dumps.glob(f"{stem}_*.bin"):
        path.unlink()
    write_dumps(dumps, stem, labels, dets)
    boxes = {}
    for rule in ("exact", "recipe"):
        postprocess(dumps, info, tmp_path / rule, SAMPLE / "annotations", CANVAS_H, CANVAS_W, pad_rule=rule)
        line = (tmp_path / rule / f"{stem}.txt").read_text().splitlines()[0].split(" ")
        boxes[rule] = [float(v) for v in line[2:]]
    assert boxes["exact"][0] == 0.0 and boxes["exact"][2] == img["width"]
    assert boxes["recipe"][0] == pytest.approx(-30 / lb.scale, abs=1.0) and boxes["recipe"][2] == pytest.approx(img["width"] + 30 / lb.scale, abs=1.0)


def test_no_usable_dumps_or_a_bin_info_fail_instead_of_scoring_zero(setup, capsys):
    """Dumps found for no annotated image (an empty folder, or --net_out_num naming other files)
    fail with exit 1; a bin-mode .info (canvas sizes) is refused: boxes need each image's size."""
    tmp_path, dumps, info, data, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    ann = f"--annotations_path={SAMPLE / 'annotations'}"
    base = [
        "postprocess",
        f"--test_annotation={info}",
        f"--det_results_path={tmp_path / 'ret'}",
        ann,
        f"--net_input_height={CANVAS_H}",
        f"--net_input_width={CANVAS_W}",
    ]
    capsys.readouterr()
    assert main([*base, f"--bin_data_path={empty}"]) == 1
    assert "no usable dumps for any of the 10 annotated images" in capsys.readouterr().err
    assert main([*base, f"--bin_data_path={dumps}", "--net_out_num=5"]) == 1  # reads _3/_4: none exist
    assert "from --net_out_num 5" in capsys.readouterr().err
    (tmp_path / "other.info").write_text(f"0 {tmp_path / 'other.jpg'} 640 480\n")  # dumps found, no image's size listed
    assert main([*base[:1], f"--test_annotation={tmp_path / 'other.info'}", *base[2:], f"--bin_data_path={dumps}"]) == 1
    assert "no image size in" in capsys.readouterr().err
    bins = tmp_path / "bins"
    bins.mkdir()
    lines = [f"{i} {bins / (Path(img['file_name']).stem + '.bin')} {CANVAS_W} {CANVAS_H}" for i, img in enumerate(data["images"])]
    (tmp_path / "bin.info").write_text("\n".join(lines) + "\n")
    assert main([*base[:1], f"--test_annotation={tmp_path / 'bin.info'}", *base[2:], f"--bin_data_path={dumps}"]) == 2
    err = capsys.readouterr().err
    assert "bin-mode .info" in err and "get-info jpg" in err and "Traceback" not in err


def test_bad_and_missing_dumps_exit_3(setup, capsys):
    tmp_path, dumps, info, data, _ = setup
    stems = sorted(Path(img["file_name"]).stem for img in data["images"])
    for path in dumps.glob(f"{stems[0]}_*.bin"):
        path.unlink()  # one image without dumps
    for path in dumps.glob(f"{stems[1]}_*.bin"):
        path.write_bytes(path.read_bytes()[:-4])  # one torn pair
    out = tmp_path / "ret"
    code = main(
        [
            "postprocess",
            f"--bin-data-path={dumps}",
            f"--test-annotation={info}",
            f"--det-results-path={out}",
            f"--annotations-path={SAMPLE / 'annotations' / 'instances_val2017_sample.json'}",
            f"--net-input-height={CANVAS_H}",
            f"--net-input-width={CANVAS_W}",
        ]
    )
    printed = capsys.readouterr().err  # skip notices go to stderr
    assert code == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_dumps"] == 2  # the deleted image and the one whose dump was skipped
    assert summary["missing_dump_files"] == [f"{stems[0]}.jpg", f"{stems[1]}.jpg"]
    assert len(summary["skipped"]) == 1 and stems[1] in summary["skipped"][0]["path"]
    assert "fits neither" in summary["skipped"][0]["problem"]
    assert 0.0 < summary["bbox_mAP"] < 1.0
    assert f"skipped: {summary['skipped'][0]['path']}" in printed


def test_a_rerun_into_the_same_folder_leaves_only_its_own_text_files(setup):
    """The per-image .txt files of an earlier evaluation into the same folder do not outlive it; a user's own files stay."""
    tmp_path, dumps, info, data, _ = setup
    ann = SAMPLE / "annotations" / "instances_val2017_sample.json"
    out = tmp_path / "ret"
    postprocess(dumps, info, out, ann, CANVAS_H, CANVAS_W)
    stems = sorted(Path(img["file_name"]).stem for img in data["images"])
    assert {p.stem for p in out.glob("*.txt")} == set(stems)
    (out / "notes.txt").write_text("a user's file")
    for path in dumps.glob(f"{stems[0]}_*.bin"):
        path.unlink()  # the next evaluation has no result for this image
    summary = postprocess(dumps, info, out, ann, CANVAS_H, CANVAS_W)
    assert {p.stem for p in out.glob("*.txt")} == set(stems[1:]) | {"notes"}
    assert sorted(summary["text_files"]) == [f"{s}.txt" for s in stems[1:]]


def test_the_labels_infer_recorded_decide_the_category_mapping(setup, tmp_path):
    """Dumps whose summary.json (written by infer) records a 91-label model, torchvision's layout,
    are scored with label = category id, with no --class-names; a 6-label model against COCO's
    categories is refused instead of being scored with COCO's mapping."""
    _, dumps, info, data, _ = setup
    ann = SAMPLE / "annotations" / "instances_val2017_sample.json"
    tv = tmp_path / "tv_dumps"
    tv.mkdir()
    for path in dumps.iterdir():  # the same boxes, labels as torchvision's 91-label model gives them
        tv.joinpath(path.name).write_bytes(path.read_bytes())
    for labels_path in tv.glob("*.bin"):
        if labels_path.stat().st_size == 800:  # the int64 labels of a pair
            labels = np.fromfile(labels_path, np.int64)
            labels[labels >= 0] = np.array(COCO80_CATEGORY_IDS)[labels[labels >= 0]]
            labels.tofile(labels_path)
    engine = {"input_hw": [CANVAS_H, CANVAS_W], "num_classes": 91, "class_names": None}
    (tv / "summary.json").write_text(json.dumps({"engine": engine}))
    assert postprocess(tv, info, tmp_path / "tv_eval", ann, CANVAS_H, CANVAS_W)["bbox_mAP"] == pytest.approx(1.0)
    (tv / "summary.json").unlink()  # without the record the labels read as COCO-80 indices: wrong categories
    assert postprocess(tv, info, tmp_path / "tv_eval2", ann, CANVAS_H, CANVAS_W)["bbox_mAP"] < 0.5
    (dumps / "summary.json").write_text(json.dumps({"engine": {**engine, "num_classes": 6, "class_names": list("abcdef")}}))
    with pytest.raises(FcosError, match="the model has 6 classes but the annotation file lists 23 categories"):
        postprocess(dumps, info, tmp_path / "six", ann, CANVAS_H, CANVAS_W)
