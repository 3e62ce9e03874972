"""``fcos-offline predict``: drawn images, every detection as COCO results (the same mAP as infer + postprocess),
``--save-txt`` lines, skipped images, refused outputs; and the shared drawing module."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shared_data_dir

from fcos_offline.cli import main
from fcos_offline.data.draw import class_colour, draw_detections, label_origin, line_width
from fcos_offline.demo import DEMO_CHECKPOINT
from fcos_offline.demo.synthetic import DEMO_CANVAS, make_demo_data
from fcos_offline.engine.predict import PredictRequest, category_id, image_ids, predict

NUM_DEMO = 12


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """The demo checkpoint on demo images through the library call (exports it once; later tests reuse the ONNX)."""
    root = tmp_path_factory.mktemp("predict")
    data = make_demo_data(root / "data", "val", NUM_DEMO, seed=1000)
    out = root / "seen"
    summary = predict(PredictRequest(model=DEMO_CHECKPOINT, images=[data["image_dir"]], output=out, shape=DEMO_CANVAS, save_txt=True, workers=0))
    return {"root": root, "data": data, "out": out, "summary": summary}


def test_demo_predictions_give_exactly_the_map_of_infer_and_postprocess(demo_run: dict) -> None:
    from fcos_offline.data.info import make_info
    from fcos_offline.engine.job import InferRequest, infer
    from fcos_offline.evaluate.coco import evaluate_bbox
    from fcos_offline.evaluate.postprocess import postprocess

    root, data, out, summary = demo_run["root"], demo_run["data"], demo_run["out"], demo_run["summary"]
    images = sorted(Path(data["image_dir"]).iterdir())
    assert summary["images"] == summary["drawn_images"] == NUM_DEMO and not summary["skipped"]
    for img in images:
        drawn, original = cv2.imread(str(out / f"{img.stem}.jpg")), cv2.imread(str(img))
        assert drawn is not None and original is not None and drawn.shape == original.shape
    assert json.loads((out / "predict.json").read_text())["detections"] == summary["detections"]

    # the recipe's path on the same images with the same exported model
    dumps = root / "dumps"
    infer(InferRequest(model=summary["exported_model"], images=data["image_dir"], output=dumps, workers=0))
    make_info("jpg", data["image_dir"], root / "fcos_jpeg.info", workers=1)
    reference = postprocess(dumps, root / "fcos_jpeg.info", root / "eval", data["ann_file"])

    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == summary["detections"] == reference["num_detections"]
    assert min(r["score"] for r in results) < summary["score_thr"]  # every detection, not only the drawn ones
    ann = json.loads(Path(data["ann_file"]).read_text())
    ids = {i["file_name"]: i["id"] for i in ann["images"]}
    mapped = [{k: v for k, v in dict(r, image_id=ids[r["file_name"]]).items() if k != "file_name"} for r in results]
    ours = evaluate_bbox(ann, mapped)
    assert ours["bbox_mAP"] > 0.2  # the demo model sees its shapes
    assert ours["stats"] == reference["stats"] and ours["bbox_mAP"] == reference["bbox_mAP"]


def test_coco_photos_json_and_txt_agree(demo_run: dict, tmp_path: Path, capsys) -> None:
    sample = shared_data_dir() / "val2017"
    out = tmp_path / "seen"
    model = demo_run["summary"]["exported_model"]
    code = main(["predict", "--model", model, "--images", str(sample), "--output", str(out), "--save-txt", "--score-thr", "0.25", "--workers", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "images drawn / given" in printed and "10 / 10" in printed
    photos = sorted(sample.glob("*.jpg"))
    assert len(photos) == 10 and sorted(p.name for p in out.glob("*.jpg")) == [p.name for p in photos]
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} <= {p.name for p in photos}
    assert all(r["image_id"] == int(Path(r["file_name"]).stem) for r in results)  # COCO ids from the file names
    summary = json.loads((out / "predict.json").read_text())
    names = summary["class_names"]
    assert names == ["circle", "square", "triangle", "star", "ring", "cross"]
    drawn = 0
    for photo in photos:
        lines = (out / "labels" / f"{photo.stem}.txt").read_text().splitlines()
        drawn += len(lines)
        from_txt = []
        for line in lines:
            label, name, score, *xyxy = line.split(" ")
            assert name == names[int(label)]
            from_txt.append((int(label) + 1, round(float(score), 6), *(round(float(v), 2) for v in xyxy)))
        from_json = [
            (
                r["category_id"],
                round(r["score"], 6),
                *(round(v, 2) for v in (r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3])),
            )
            for r in results
            if r["file_name"] == photo.name and r["score"] >= 0.25
        ]
        assert len(from_txt) == len(from_json)
        if from_txt:  # x2, y2 from the JSON's x + w may round the other way at the second decimal
            np.testing.assert_allclose(np.array(sorted(from_txt)), np.array(sorted(from_json)), atol=0.011)
    assert drawn == summary["detections_drawn"] and len(results) == summary["detections"] > drawn


def test_a_corrupt_image_is_named_and_skipped_with_exit_3(demo_run: dict, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted(Path(demo_run["data"]["image_dir"]).iterdir())[:2]:
        shutil.copy(src, images / src.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    out = tmp_path / "seen"
    code = main(["predict", "--model", demo_run["summary"]["exported_model"], "--images", str(images), "--output", str(out), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 3
    assert "broken.jpg" in err
    summary = json.loads((out / "predict.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == [str(images / "broken.jpg")]
    assert summary["drawn_images"] == 2 and not (out / "broken.jpg").exists()


def test_output_inside_the_image_folder_is_refused(demo_run: dict, capsys) -> None:
    images = Path(demo_run["data"]["image_dir"])
    before = sorted(images.iterdir())
    code = main(["predict", "--model", demo_run["summary"]["exported_model"], "--images", str(images), "--output", str(images / "seen")])
    assert code == 2 and "inside the input" in capsys.readouterr().err
    assert sorted(images.iterdir()) == before


def test_ids_and_categories() -> None:
    from fcos_offline.data.dataset import InputItem

    coco = [InputItem("000000000139", "a", "image"), InputItem("000000000285", "b", "image")]
    assert image_ids(coco) == [139, 285]
    assert image_ids([*coco, InputItem("cat", "c", "image")]) == [0, 1, 2]
    assert category_id(11, 80) == 13 and category_id(13, 91) == 13 and category_id(0, 6) == 1


# ---------------------------------------------------------------------------- drawing


def test_palette_is_deterministic_and_distinct() -> None:
    colours = [class_colour(i) for i in range(80)]
    assert colours == [class_colour(i) for i in range(80)] and len(set(colours)) == 80
    for a, b in itertools.pairwise(colours):  # neighbours differ clearly
        assert sum(abs(x - y) for x, y in zip(a, b)) > 60


def test_labels_stay_inside_the_image() -> None:
    assert label_origin((50, 40, 90, 80), (30, 12), (100, 200)) == (50, 28)  # above the box
    assert label_origin((50, 2, 90, 80), (30, 12), (100, 200)) == (50, 2)  # no room above: inside its top
    assert label_origin((50, 2, 90, 8), (30, 12), (100, 200)) == (50, 8)  # a flat box: below it
    assert label_origin((190, 2, 199, 99), (30, 12), (100, 200)) == (170, 2)  # right edge: shifted in
    assert line_width(200, 200) == 1 and line_width(480, 640) == 2 and line_width(800, 1333) == 3


def test_detections_draw_in_their_class_colour_above_the_threshold() -> None:
    boxes = np.array([[10, 10, 60, 50, 0.9], [20, 20, 90, 80, 0.1], [0, 0, 0, 0, 0.0]], np.float32)
    labels = np.array([0, 1, -1])
    solid = draw_detections(np.zeros((100, 120, 3), np.uint8), labels, boxes, ["a", "b"], 0.3)
    assert tuple(int(v) for v in solid[30, 10]) == class_colour(0)  # the box's left edge, in its class colour
    assert not solid[70:79, 89:91].any()  # the 0.1 detection is below the threshold
    gt = draw_detections(np.zeros((100, 120, 3), np.uint8), labels[:2], boxes[:2, :4], ["a", "b"])  # ground truth: no score
    assert tuple(int(v) for v in gt[70, 20]) == class_colour(1)


def test_coco_photos_predictions_are_what_infer_and_postprocess_evaluate(tmp_path: Path) -> None:
    """An 80-class model (a random RetinaNet) on the 10 COCO photos: predictions.json holds exactly the results
    postprocess evaluates from infer's dumps (same boxes, scores and COCO categories), so both score the same mAP."""
    from conftest import make_fcos, save_mmdet_ckpt

    from fcos_offline.data.info import make_info
    from fcos_offline.engine.job import InferRequest, infer
    from fcos_offline.evaluate.postprocess import RESULTS_FILE, postprocess

    sample = shared_data_dir()
    ckpt = save_mmdet_ckpt(make_fcos(seed=21, family="retinanet", style="pytorch", cls_std=1.0), tmp_path / "retinanet.pth")
    out = tmp_path / "seen"
    summary = predict(PredictRequest(model=ckpt, images=[sample / "val2017"], output=out, shape=(256, 384), workers=0))
    infer(InferRequest(model=summary["exported_model"], images=str(sample / "val2017"), output=str(tmp_path / "dumps"), workers=0))
    make_info("jpg", sample / "val2017", tmp_path / "jpg.info", workers=1)
    reference = postprocess(tmp_path / "dumps", tmp_path / "jpg.info", tmp_path / "eval", sample / "annotations")
    theirs = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())
    ours = json.loads((out / "predictions.json").read_text())

    def key(r: dict) -> tuple:
        return (r["image_id"], r["category_id"], round(r["score"], 6), *(round(v, 3) for v in r["bbox"]))

    assert len(ours) == len(theirs) == reference["num_detections"] > 100
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
