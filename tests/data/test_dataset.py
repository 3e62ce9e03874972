"""The evaluation set: subsets by count and exclusion, a digest that only changes with the data, demo splits by range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcos_offline.data.dataset import prepare_eval_set
from fcos_offline.demo.synthetic import demo_split, make_demo_data


@pytest.fixture(scope="module")
def demo8(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    make_demo_data(root, "val", 8, seed=7)
    return root


def _ann(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


def test_a_subset_keeps_its_digest_when_prepared_again(demo8, tmp_path) -> None:
    """Rebuilding the same first-N subset must not look like new data (tune and run resume by this digest)."""
    first = prepare_eval_set(tmp_path / "l", demo8 / "val2017", _ann(demo8), 5)
    again = prepare_eval_set(tmp_path / "l", demo8 / "val2017", _ann(demo8), 5)
    assert first.ann_file != _ann(demo8) and len(first.items) == 5
    assert again.digest == first.digest
    other = prepare_eval_set(tmp_path / "l", demo8 / "val2017", _ann(demo8), 6)
    assert other.digest != first.digest


def test_excluded_images_are_left_out_before_counting(demo8, tmp_path) -> None:
    names = sorted(p.name for p in (demo8 / "val2017").iterdir())
    exclude = frozenset(str(demo8 / "val2017" / n) for n in names[:3])
    es = prepare_eval_set(tmp_path / "l", demo8 / "val2017", _ann(demo8), 4, exclude=exclude)
    assert [Path(i.path).name for i in es.items] == names[3:7]
    subset = json.loads(es.ann_file.read_text())
    kept = {i["id"] for i in subset["images"]}
    assert {i["file_name"] for i in subset["images"]} == set(names[3:7])
    assert subset["annotations"] and all(a["image_id"] in kept for a in subset["annotations"])
    everything_after = prepare_eval_set(tmp_path / "m", demo8 / "val2017", _ann(demo8), None, exclude=exclude)
    assert len(everything_after.items) == 5 and everything_after.ann_file != _ann(demo8)


def test_a_later_range_of_a_demo_split_is_the_same_images(demo8, tmp_path) -> None:
    """Images 5..7 generated alone are byte-identical to those of the whole split, with the same ids and annotations."""
    part = demo_split(tmp_path / "part", "val", 3, seed=7, first=5)
    whole, piece = json.loads(_ann(demo8).read_text()), json.loads(_ann(part).read_text())
    names = sorted(p.name for p in (part / "val2017").iterdir())
    assert names == sorted(p.name for p in (demo8 / "val2017").iterdir())[5:]
    for n in names:
        assert (part / "val2017" / n).read_bytes() == (demo8 / "val2017" / n).read_bytes()
    assert piece["images"] == whole["images"][5:]
    ids = {i["id"] for i in piece["images"]}
    assert [a["bbox"] for a in piece["annotations"]] == [a["bbox"] for a in whole["annotations"] if a["image_id"] in ids]


def test_missing_images_are_named_up_to_ten_then_counted(demo8, tmp_path, capsys) -> None:
    """A half-copied folder must not flood the terminal: ten named, the rest counted; all are recorded."""
    data = json.loads(_ann(demo8).read_text())
    last = max(i["id"] for i in data["images"])
    data["images"] += [dict(data["images"][0], id=last + k, file_name=f"gone{k:02d}.jpg") for k in range(1, 14)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    capsys.readouterr()
    es = prepare_eval_set(tmp_path / "l", demo8 / "val2017", ann)
    err = capsys.readouterr().err
    assert len(es.items) == 8 and len(es.missing) == 13
    assert sum("annotated image is missing" in line for line in err.splitlines()) == 10
    assert "and 3 more annotated images skipped" in err
