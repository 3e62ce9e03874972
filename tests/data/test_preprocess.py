"""Preprocessing against an independent mmcv-equivalent reference, bad inputs, the CLI verb."""

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE, needs_sample

from fcos_offline.cli import main
from fcos_offline.data.preprocess import list_images, preprocess_folder, preprocess_image, read_image
from fcos_offline.errors import BadFileError


def mmcv_like_reference(path: Path, canvas_h: int, canvas_w: int) -> np.ndarray:
    """Spec §8.2 the way the recipe composes mmcv: imread, imresize, imnormalize, impad, transpose."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    s = min(canvas_w / w, canvas_h / h)
    new_w, new_h = int(np.floor(w * s)), int(np.floor(h * s))
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normed = resized.astype(np.float32)
    cv2.subtract(normed, np.float64([[102.9801, 115.9465, 122.7717]]), normed)
    cv2.multiply(normed, np.float64([[1.0, 1.0, 1.0]]), normed)
    left, top = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    padded = cv2.copyMakeBorder(normed, top, canvas_h - new_h - top, left, canvas_w - new_w - left, cv2.BORDER_CONSTANT, value=0)
    return np.ascontiguousarray(padded.transpose(2, 0, 1))


@needs_sample
@pytest.mark.parametrize(("canvas_h", "canvas_w"), [(800, 1333), (320, 512)])
def test_sample_images_match_reference(canvas_h, canvas_w):
    images = list_images(SAMPLE / "val2017")
    assert len(images) == 10
    for path in images:
        tensor, lb = preprocess_image(read_image(path), canvas_h, canvas_w)
        expected = mmcv_like_reference(path, canvas_h, canvas_w)
        assert tensor.dtype == np.float32 and tensor.shape == (3, canvas_h, canvas_w)
        # same float32 operations as mmcv (cv2 scalar subtract == numpy float32 subtract): bit-exact
        np.testing.assert_array_equal(tensor, expected, err_msg=path.name)
        # padding is exactly zero outside the resized image
        inside = np.zeros((canvas_h, canvas_w), bool)
        inside[lb.pad_top : lb.pad_top + lb.new_h, lb.pad_left : lb.pad_left + lb.new_w] = True
        assert not tensor[:, ~inside].any()


@needs_sample
def test_folder_writes_reference_bytes(tmp_path):
    summary = preprocess_folder(SAMPLE / "val2017", tmp_path / "bins", 320, 512, workers=1)
    assert summary.written == 10 and not summary.bad
    assert summary.images_per_s > 0
    for path in list_images(SAMPLE / "val2017"):
        data = (tmp_path / "bins" / f"{path.stem}.bin").read_bytes()
        assert len(data) == 3 * 320 * 512 * 4
        assert data == mmcv_like_reference(path, 320, 512).tobytes()
    assert sorted(p.name for p in (tmp_path / "bins").glob("*.bin")) == sorted(f"{p.stem}.bin" for p in list_images(SAMPLE / "val2017"))


def _jpeg_bytes(seed: int, shape=(120, 160)) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (7, 7), 0)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_read_image_matches_imread_for_odd_formats(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "exif6.jpg": _with_exif_orientation(_jpeg_bytes(1, (40, 60)), 6),
        "gray.png": cv2.imencode(".png", rng.integers(0, 256, (30, 50), dtype=np.uint8))[1].tobytes(),
        "rgba.png": cv2.imencode(".png", rng.integers(0, 256, (30, 50, 4), dtype=np.uint8))[1].tobytes(),
        "deep.png": cv2.imencode(".png", rng.integers(0, 65536, (30, 50, 3), dtype=np.uint16))[1].tobytes(),
        "plain.bmp": cv2.imencode(".bmp", rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))[1].tobytes(),
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        got = read_image(path)
        expected = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert read_image(tmp_path / "exif6.jpg").shape[:2] == (60, 40)  # rotated by EXIF


def _write_bad_files(folder: Path) -> dict[str, str]:
    good = _jpeg_bytes(2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("this is a text file, not a picture\n")
    bmp = cv2.imencode(".bmp", np.zeros((20, 20, 3), np.uint8))[1].tobytes()
    (folder / "short.BMP").write_bytes(bmp[:-100])
    return {"empty.jpg": "empty", "cut.jpg": "truncated JPEG", "notes.jpg": "not a decodable", "short.BMP": "truncated BMP"}


def test_read_image_rejects_bad_files(tmp_path):
    for name, problem in _write_bad_files(tmp_path).items():
        with pytest.raises(BadFileError, match=problem) as info:
            read_image(tmp_path / name)
        assert info.value.path.endswith(name)
    with pytest.raises(BadFileError, match="cannot read"):
        read_image(tmp_path / "missing.jpg")


def test_jpeg_with_trailing_bytes_is_accepted(tmp_path):
    path = tmp_path / "trailer.jpg"
    path.write_bytes(_jpeg_bytes(3) + b"\x00" * 64)
    assert read_image(path).shape == (120, 160, 3)


def test_cli_preprocess_skips_and_lists_bad_files(tmp_path, capsys):
    src, dst = tmp_path / "images", tmp_path / "bins"
    src.mkdir()
    bad = _write_bad_files(src)
    (src / "a.jpg").write_bytes(_jpeg_bytes(4))
    cv2.imwrite(str(src / "b.PNG"), np.full((50, 70, 3), 200, np.uint8))
    (src / "readme.txt").write_text("not an image extension: ignored")
    code = main(
        [
            "preprocess",
            f"--image_src_path={src}",
            f"--bin_file_path={dst}",
            "--model_input_height=64",
            "--model_input_width=96",
            "--workers=2",
        ]
    )
    printed = capsys.readouterr()
    out = printed.out
    assert code == 3
    assert sorted(p.name for p in dst.glob("*.bin")) == ["a.bin", "b.bin"]
    for name in ("a.bin", "b.bin"):
        assert (dst / name).stat().st_size == 3 * 64 * 96 * 4
    expected_b = mmcv_like_reference(src / "b.PNG", 64, 96)
    np.testing.assert_array_equal(np.fromfile(dst / "b.bin", np.float32).reshape(3, 64, 96), expected_b)
    skipped = [line for line in printed.err.splitlines() if line.startswith("skipped:")]  # named on stderr
    assert len(skipped) == len(bad)
    for name, problem in bad.items():
        assert any(name in line and problem in line for line in skipped), (name, skipped)
    assert "2 .bin files" in out and "images/s" in out
    record = json.loads((dst / "preprocess.json").read_text())
    assert record["written"] == 2 and record["canvas"] == [64, 96] and len(record["skipped"]) == len(bad)
    assert {Path(k["path"]).name for k in record["skipped"]} == set(bad)


def test_cli_preprocess_fails_when_nothing_usable(tmp_path, capsys):
    src = tmp_path / "images"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    assert main(["preprocess", "--image-src-path", str(src), "--bin-file-path", str(tmp_path / "o")]) == 1
    assert "no image could be preprocessed" in capsys.readouterr().err


def test_cli_preprocess_refuses_a_file_as_the_output_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    assert cv2.imwrite(str(images / "a.jpg"), np.full((40, 60, 3), 128, np.uint8))
    target = tmp_path / "afile"
    target.write_text("mine")
    code = main(["preprocess", f"--image_src_path={images}", f"--bin_file_path={target}"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err and "Traceback" not in err and target.read_text() == "mine"
