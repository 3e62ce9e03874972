"""get-info (bin and jpg modes) byte format and the .info reader."""

import cv2
import numpy as np
import pytest

from fcos_offline.cli import main
from fcos_offline.data.info import InfoEntry, read_info
from fcos_offline.errors import FcosError


def test_bin_mode_format(tmp_path, capsys):
    src = tmp_path / "bins"
    src.mkdir()
    for name in ("c.bin", "a.bin", "b.bin"):
        (src / name).write_bytes(bytes(3 * 4 * 2 * 4))
    (src / "ignored.txt").write_text("x")
    out = tmp_path / "fcos.info"
    assert main(["get-info", "bin", str(src), str(out), "4", "2"]) == 0
    assert out.read_bytes() == (f"0 {src}/a.bin 4 2\n1 {src}/b.bin 4 2\n2 {src}/c.bin 4 2\n").encode()
    assert "3 lines" in capsys.readouterr().out


def test_bin_mode_skips_wrong_size(tmp_path, capsys):
    src = tmp_path / "bins"
    src.mkdir()
    (src / "good.bin").write_bytes(bytes(3 * 4 * 2 * 4))
    (src / "short.bin").write_bytes(bytes(10))
    out = tmp_path / "fcos.info"
    assert main(["get-info", "bin", str(src), str(out), "4", "2"]) == 3
    assert out.read_text() == f"0 {src}/good.bin 4 2\n"
    assert "short.bin" in capsys.readouterr().err  # skips go to stderr, like every verb's warnings


def test_jpg_mode_true_sizes(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    cv2.imwrite(str(src / "b.jpg"), np.zeros((30, 50, 3), np.uint8))
    cv2.imwrite(str(src / "a.PNG"), np.zeros((7, 11, 3), np.uint8))
    cv2.imwrite(str(src / "c.jpeg"), np.zeros((64, 48, 3), np.uint8))
    out = tmp_path / "jpeg.info"
    assert main(["get-info", "jpg", str(src), str(out), "--workers=1"]) == 0
    assert out.read_bytes() == (f"0 {src}/a.PNG 11 7\n1 {src}/b.jpg 50 30\n2 {src}/c.jpeg 48 64\n").encode()
    (src / "d.jpg").write_bytes(b"")
    assert main(["get-info", "jpg", str(src), str(out), "--workers=1"]) == 3
    assert "d.jpg" in capsys.readouterr().err
    assert [e.path.rsplit("/", 1)[1] for e in read_info(out)] == ["a.PNG", "b.jpg", "c.jpeg"]


def test_usage_errors(tmp_path, capsys):
    assert main(["get-info", "bin", str(tmp_path), str(tmp_path / "x.info")]) == 2
    assert main(["get-info", "jpg", str(tmp_path), str(tmp_path / "x.info"), "4", "2"]) == 2
    assert main(["get-info", "bin", str(tmp_path), str(tmp_path / "x.info"), "4", "2"]) == 1  # no .bin
    assert not (tmp_path / "x.info").exists()
    assert "no .bin files" in capsys.readouterr().err


def test_read_info_round_trip_and_spaces(tmp_path):
    path = tmp_path / "list.info"
    path.write_text("0 /data/a b.jpg 640 480\n\n1 rel/c.jpg 500 375\n")
    assert read_info(path) == [InfoEntry(0, "/data/a b.jpg", 640, 480), InfoEntry(1, "rel/c.jpg", 500, 375)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 a.jpg 640", "expected '<index> <path> <width> <height>'"),
        ("0 a.jpg 640 4x8", "must be integers"),
        ("x a.jpg 640 480", "must be integers"),
        ("0 a.jpg 0 480", "positive"),
    ],
)
def test_read_info_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.info"
    path.write_text(f"0 ok.jpg 10 10\n{line}\n")
    with pytest.raises(FcosError, match=message) as info:
        read_info(path)
    assert f"{path}:2:" in str(info.value)


def test_a_json_file_or_a_huge_line_is_named_not_echoed(tmp_path):
    """An annotation JSON given as the .info is called a JSON file; a long bad line is cut, not printed whole."""
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [' + ", ".join(f'{{"id": {i}, "file_name": "{i:012d}.jpg"}}' for i in range(300)) + "]}")
    with pytest.raises(FcosError, match=r"a JSON file, not an \.info list") as info:
        read_info(ann)
    assert len(str(info.value)) < 300
    long = tmp_path / "long.info"
    long.write_text("0 ok.jpg 10 10\n" + "x" * 9000 + "\n")
    with pytest.raises(FcosError, match=r"9,000 characters") as info:
        read_info(long)
    assert len(str(info.value)) < 400


def test_read_info_missing_file(tmp_path):
    with pytest.raises(FcosError, match="cannot read info file"):
        read_info(tmp_path / "nope.info")


def test_jpg_mode_keeps_the_first_of_two_images_with_one_stem(tmp_path, capsys):
    """Dumps are named by stem: like preprocess, get-info lists only the first of dup.jpg / dup.png."""
    src = tmp_path / "imgs"
    src.mkdir()
    cv2.imwrite(str(src / "dup.jpg"), np.zeros((30, 50, 3), np.uint8))
    cv2.imwrite(str(src / "dup.png"), np.zeros((7, 11, 3), np.uint8))
    out = tmp_path / "jpeg.info"
    assert main(["get-info", "jpg", str(src), str(out), "--workers=1"]) == 3
    assert out.read_text() == f"0 {src}/dup.jpg 50 30\n"
    assert "dup.png" in capsys.readouterr().err
