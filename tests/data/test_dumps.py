"""Dump files: recipe and ais_bench namings, .npy, size checks, atomic writes."""

import os

import numpy as np
import pytest

from fcos_offline.data import dumps as dumps_mod
from fcos_offline.data.dumps import dump_paths, dumps_complete, read_dumps, write_dumps
from fcos_offline.errors import BadFileError, FcosError


def _example(seed: int, n_valid: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.full(100, -1, np.int64)
    dets = np.zeros((100, 5), np.float32)
    labels[:n_valid] = rng.integers(0, 80, n_valid)
    xy = rng.uniform(0, 600, (n_valid, 2))
    dets[:n_valid, :4] = np.concatenate([xy, xy + rng.uniform(5, 200, (n_valid, 2))], axis=1)
    dets[:n_valid, 4] = np.sort(rng.uniform(0.05, 1, n_valid))[::-1]
    return labels, dets


def _assert_same(pair, labels, dets):
    got_labels, got_dets = pair
    assert got_labels.dtype == np.int64 and got_labels.shape == (100,)
    assert got_dets.dtype == np.float32 and got_dets.shape == (100, 5)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_dets, dets)


def test_recipe_naming_round_trip(tmp_path):
    labels, dets = _example(0)
    labels_path, dets_path = write_dumps(tmp_path, "000000004495", labels, dets)
    assert (labels_path.name, dets_path.name) == ("000000004495_1.bin", "000000004495_2.bin")
    assert labels_path.stat().st_size == 800 and dets_path.stat().st_size == 2000
    assert np.array_equal(np.fromfile(dets_path, np.float32).reshape(100, 5), dets)  # raw tofile layout
    assert dumps_complete(tmp_path, "000000004495")
    for net_out_num in (None, 3):
        loaded = read_dumps(tmp_path, net_out_num=net_out_num)
        assert list(loaded) == ["000000004495"]
        _assert_same(loaded["000000004495"], labels, dets)
    assert sorted(os.listdir(tmp_path)) == ["000000004495_1.bin", "000000004495_2.bin"]  # no temp files


def test_ais_bench_naming_detected_by_size(tmp_path):
    """ais_bench numbers outputs from 0: _0 = labels, _1 = dets (the recipe's _1 is labels)."""
    labels, dets = _example(1)
    labels.tofile(tmp_path / "img_a_0.bin")
    dets.tofile(tmp_path / "img_a_1.bin")
    other_labels, other_dets = _example(2)
    write_dumps(tmp_path, "img_b", other_labels, other_dets)  # recipe naming in the same folder
    loaded = read_dumps(tmp_path)
    assert list(loaded) == ["img_a", "img_b"]
    _assert_same(loaded["img_a"], labels, dets)
    _assert_same(loaded["img_b"], other_labels, other_dets)
    with pytest.raises(BadFileError, match="omit net_out_num"):
        read_dumps(tmp_path, net_out_num=3)
    skipped: list[BadFileError] = []
    loaded = read_dumps(tmp_path, net_out_num=2, skipped=skipped)  # 0-based: labels _0, dets _1
    assert list(loaded) == ["img_a"]
    _assert_same(loaded["img_a"], labels, dets)
    assert len(skipped) == 1 and "no img_b_0.bin" in skipped[0].problem


def test_npy_round_trip(tmp_path):
    labels, dets = _example(3)
    labels_path, dets_path = write_dumps(tmp_path, "x", labels, dets, fmt="npy")
    assert (labels_path.name, dets_path.name) == ("x_labels.npy", "x_dets.npy")
    assert dumps_complete(tmp_path, "x", fmt="npy") and not dumps_complete(tmp_path, "x", fmt="bin")
    _assert_same(read_dumps(tmp_path)["x"], labels, dets)


def test_wrong_size_is_a_clear_error_and_can_be_skipped(tmp_path):
    labels, dets = _example(4)
    write_dumps(tmp_path, "good", labels, dets)
    (tmp_path / "bad_1.bin").write_bytes(bytes(800))
    (tmp_path / "bad_2.bin").write_bytes(bytes(1999))
    with pytest.raises(BadFileError, match="1999 bytes fits neither dump") as info:
        read_dumps(tmp_path)
    assert info.value.path.endswith("bad_2.bin")
    assert "800 bytes" in str(info.value) and "2000 bytes" in str(info.value)
    skipped: list[BadFileError] = []
    loaded = read_dumps(tmp_path, skipped=skipped)
    assert list(loaded) == ["good"]
    assert [os.path.basename(e.path) for e in skipped] == ["bad_2.bin"]


def test_unpaired_and_misnamed_files(tmp_path):
    labels, dets = _example(5)
    labels.tofile(tmp_path / "lonely_1.bin")
    (tmp_path / "input.bin").write_bytes(bytes(2000))
    np.save(tmp_path / "half_dets.npy", dets)
    np.save(tmp_path / "wrong_labels.npy", np.zeros(99, np.int64))
    np.save(tmp_path / "wrong_dets.npy", dets)
    (tmp_path / "sumary.json").write_text("{}")  # ais_bench's own file: ignored
    skipped: list[BadFileError] = []
    assert read_dumps(tmp_path, skipped=skipped) == {}
    problems = {os.path.basename(e.path): e.problem for e in skipped}
    assert "no dets dump for lonely" in problems["lonely_1.bin"]
    assert "not a dump name" in problems["input.bin"]
    assert "no labels .npy for half" in problems["half_dets.npy"]
    # any K is read: 99 labels are valid, so the dets (100 rows) are the file that does not fit
    assert "(100, 5)" in problems["wrong_dets.npy"] and "x 99" in problems["wrong_dets.npy"]


def test_dumps_complete_detects_partial(tmp_path):
    labels, dets = _example(6)
    write_dumps(tmp_path, "s", labels, dets)
    labels_path, dets_path = dump_paths(tmp_path, "s")
    dets_path.write_bytes(dets_path.read_bytes()[:100])
    assert not dumps_complete(tmp_path, "s")
    dets_path.unlink()
    assert not dumps_complete(tmp_path, "s")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    labels, dets = _example(7)

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_dumps(tmp_path, "s", labels, dets)
    assert os.listdir(tmp_path) == []


def test_write_validates_shapes_and_format(tmp_path):
    labels, dets = _example(8)
    with pytest.raises(FcosError, match=r"\[N, 5\]"):
        write_dumps(tmp_path, "s", labels, dets[:, :4])
    with pytest.raises(FcosError, match="format"):
        write_dumps(tmp_path, "s", labels, dets, fmt="pkl")
    assert dumps_mod.NUM_DETS == 100
