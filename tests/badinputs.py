"""The bad-input corpus of the reliability tests: one builder per case, generated on the fly.

Nothing here is committed as a binary: every file is written by a builder into a test's temporary
folder. Builders take the folder to write into and return the path they wrote.

* images (:data:`IMAGE_CASES`): what ``preprocess``, ``get-info jpg``, ``infer --images`` and
  ``run`` meet in an image folder — broken files that must be skipped and listed, and
  valid-but-unusual pictures that must be processed exactly like ``cv2.imread(IMREAD_COLOR)``
  plus the recipe's letterbox (:func:`recipe_tensor`);
* lists, tensors and dumps: a ``.bin`` of the wrong size, ``.info`` lines with a missing field or
  a path that does not exist, dumps holding NaN / inf;
* annotation JSON: an image id without a file, a category the model does not know, an empty
  annotations list;
* models: a plain ResNet state dict, a pickle that would run code when loaded, ONNX files with
  other input/output names (same detector, renamed and reordered) or a foreign graph.

It also keeps the reliability log: every reliability test calls :func:`record` with the case, the
verb, the exit code and the stderr line about the case; :func:`write_log` (run at the end of the
session by the ``reliability_log`` fixture when ``FCOS_WRITE_RELIABILITY=1`` or
``FCOS_RELIABILITY_JSON=path`` is set) saves them as JSON, and ``tools/reliability_table.py``
renders ``docs/reliability.md`` from that file.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CANVAS = (128, 192)  # H, W of the tiny test model
MEAN_BGR = np.array([102.9801, 115.9465, 122.7717], np.float32)


# --------------------------------------------------------------------------- reliability log


@dataclass
class Observation:
    """One row of docs/reliability.md."""

    case: str
    verb: str
    exit_code: int | None  # None: a library-level check (fuzzing), no process exit
    line: str
    behaviour: str
    test: str


RECORDS: dict[tuple[str, str], Observation] = {}


_TMP = re.compile(r"/\S*?/reliability-tmpfs-\w+/|/\S*?/pytest-\d+/[^/\s]+/")


_TIMING = re.compile(r"\d+(?:\.\d+)? (img/s|images/s|ms|s)\b")


def sanitize(text: str) -> str:
    """Drop what changes from run to run: the temporary folder (``…/``) and timings (``… ms``)."""
    return _TIMING.sub(r"… \1", _TMP.sub("…/", text))


def record(case: str, verb: str, code: int | None, text: str, behaviour: str, needle: str | None = None) -> str:
    """Note what ``verb`` did with ``case`` (``text``: its stderr, or stderr + stdout where it lists
    skipped files on stdout); returns the line recorded: the first naming ``needle`` if given."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if needle:
        line = next((ln for ln in lines if needle in ln), "")
    else:
        line = lines[0] if lines else ""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    RECORDS[(case, verb)] = Observation(case, verb, None if code is None else int(code), sanitize(line), behaviour, test)
    return line


def log_path() -> Path | None:
    """Where the log goes: $FCOS_RELIABILITY_JSON, docs/reliability.json with FCOS_WRITE_RELIABILITY=1, else None."""
    if os.environ.get("FCOS_RELIABILITY_JSON"):
        return Path(os.environ["FCOS_RELIABILITY_JSON"])
    if os.environ.get("FCOS_WRITE_RELIABILITY") == "1":
        return REPO_ROOT / "docs" / "reliability.json"
    return None


def write_log(path: Path) -> None:
    """Merge this session's observations into ``path`` (a JSON list), newest wins per (case, verb)."""
    old: dict[tuple[str, str], dict] = {}
    if path.is_file():
        try:
            old = {(r["case"], r["verb"]): r for r in json.loads(path.read_text())}
        except (ValueError, KeyError, TypeError):
            old = {}
    for key, obs in RECORDS.items():
        old[key] = obs.__dict__
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(sorted(old.values(), key=lambda r: (r["case"], r["verb"])), indent=1) + "\n")
    os.replace(tmp, path)


@pytest.fixture(scope="session", autouse=True)
def reliability_log():
    """Write the observations when the session ends (only if asked to, see :func:`log_path`)."""
    yield RECORDS
    path = log_path()
    if path is not None and RECORDS:
        write_log(path)
        if os.environ.get("FCOS_WRITE_RELIABILITY") == "1":
            subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "reliability_table.py"), str(path)], check=False)


# --------------------------------------------------------------------------- CLI helpers


def console_script() -> list[str]:
    """The installed ``fcos-offline`` entry point (or ``python -m fcos_offline``)."""
    exe = Path(sys.executable).with_name("fcos-offline")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fcos_offline"]


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """``fcos_offline.cli.main(args)`` in-process: (exit code, stdout, stderr)."""
    from fcos_offline.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(code: int, out: str, err: str, expected_code: int, *names: str) -> None:
    """The exit code is ``expected_code``, no traceback, and each of ``names`` is named on stdout/stderr."""
    both = out + err
    assert code == expected_code, f"exit {code}, expected {expected_code}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    for name in names:
        assert name in both, f"{name!r} not named in\n{both[-3000:]}"


def tune_outcome(code: int, out: str) -> str:
    """How a tune run ended, in words (exit 3 there means some configurations were not tried)."""
    if code == 3:
        reason = next((ln.split("not tried:", 1)[1].strip() for ln in out.splitlines() if "not tried:" in ln), "")
        return "completed; exit 3 because some configurations were not tried" + (f" ({reason[:90]})" if reason else "")
    return {0: "completed", 1: "failed"}.get(code, f"exit {code}")


# --------------------------------------------------------------------------- reference preprocessing


def recipe_tensor(img_bgr: np.ndarray, canvas_h: int = CANVAS[0], canvas_w: int = CANVAS[1]) -> np.ndarray:
    """The recipe's §8.2 preprocessing, written independently: keep-ratio fit, floor, bilinear, mean, centre."""
    h, w = img_bgr.shape[:2]
    s = min(canvas_w / w, canvas_h / h)
    new_w, new_h = int(np.floor(w * s)), int(np.floor(h * s))
    resized = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32) - MEAN_BGR
    out = np.zeros((canvas_h, canvas_w, 3), np.float32)
    top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def imread_tensor(path: Path) -> np.ndarray:
    """``cv2.imread(path, IMREAD_COLOR)`` + :func:`recipe_tensor`."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return recipe_tensor(img)


# --------------------------------------------------------------------------- images


def _picture(h: int, w: int, seed: int = 0, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    """Smooth colours with texture (photo-like, so JPEG is not trivially flat)."""
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    coarse = rng.integers(0, top + 1, (max(2, h // 16), max(2, w // 16), channels), dtype=np.int64).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    img = img.reshape(h, w, channels) + rng.normal(0, top / 25, (h, w, channels))
    img = np.clip(img, 0, top).astype(dtype)
    return img[:, :, 0] if channels == 1 else img


def jpeg_bytes(h: int = 72, w: int = 96, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".jpg", _picture(h, w, seed), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


def good_jpeg(folder: Path, name: str = "good.jpg", seed: int = 0, h: int = 72, w: int = 96) -> Path:
    path = folder / name
    path.write_bytes(jpeg_bytes(h, w, seed))
    return path


def empty_file(folder: Path, name: str = "empty.jpg") -> Path:
    path = folder / name
    path.write_bytes(b"")
    return path


def truncated_jpeg(folder: Path, name: str = "truncated.jpg") -> Path:
    data = jpeg_bytes(seed=1)
    path = folder / name
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def text_named_jpg(folder: Path, name: str = "text.jpg") -> Path:
    path = folder / name
    path.write_text("this is a text file with an image's name\n")
    return path


def png_alpha(folder: Path, name: str = "alpha.png") -> Path:
    img = _picture(60, 80, seed=2, channels=4)
    img[:, :40, 3] = 0  # half transparent: IMREAD_COLOR drops the alpha channel
    path = folder / name
    assert cv2.imwrite(str(path), img)
    return path


def png_16bit(folder: Path, name: str = "deep16.png") -> Path:
    path = folder / name
    assert cv2.imwrite(str(path), _picture(60, 80, seed=3, dtype=np.uint16))
    return path


def gray_jpeg(folder: Path, name: str = "gray.jpg") -> Path:
    path = folder / name
    assert cv2.imwrite(str(path), _picture(60, 80, seed=4, channels=1))
    with open(path, "rb") as f:  # one component in the SOF0 header: a real grayscale JPEG
        assert b"\xff\xc0" in f.read()
    return path


def cmyk_jpeg(folder: Path, name: str = "cmyk.jpg") -> Path:
    """A 4-component (CMYK, Adobe APP14) JPEG written by Pillow (cv2 cannot write one)."""
    from PIL import Image  # Pillow comes with matplotlib, a dependency

    rgb = _picture(60, 80, seed=5)[:, :, ::-1]
    path = folder / name
    Image.fromarray(np.ascontiguousarray(rgb)).convert("CMYK").save(path, "JPEG", quality=92)
    data = path.read_bytes()
    sof = data.index(b"\xff\xc0")
    assert data[sof + 9] == 4, "not a 4-component JPEG"
    assert b"Adobe" in data[:sof], "no Adobe APP14 marker"
    return path


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def exif_rotated_jpeg(folder: Path, name: str = "exif6.jpg") -> Path:
    """A 96x64 JPEG whose EXIF orientation 6 turns it into 64x96 (OpenCV applies it)."""
    path = folder / name
    path.write_bytes(_with_exif_orientation(jpeg_bytes(64, 96, seed=6), 6))
    return path


def one_pixel(folder: Path, name: str = "one_pixel.png") -> Path:
    path = folder / name
    assert cv2.imwrite(str(path), np.array([[[40, 90, 200]]], np.uint8))
    return path


def very_wide(folder: Path, name: str = "wide_10000x100.jpg") -> Path:
    path = folder / name
    assert cv2.imwrite(str(path), _picture(100, 10000, seed=7))
    return path


@dataclass(frozen=True)
class ImageCase:
    """A file in an image folder: ``skip`` (with the problem named) or processed like cv2.imread."""

    name: str
    build: Callable[[Path], Path]
    skip: str | None  # the problem text, or None: must be processed


IMAGE_CASES: tuple[ImageCase, ...] = (
    ImageCase("0-byte file", empty_file, "empty file (0 bytes)"),
    ImageCase("truncated JPEG", truncated_jpeg, "truncated JPEG"),
    ImageCase("text file named .jpg", text_named_jpg, "not a decodable image"),
    ImageCase("PNG with alpha", png_alpha, None),
    ImageCase("16-bit PNG", png_16bit, None),
    ImageCase("grayscale JPEG", gray_jpeg, None),
    ImageCase("CMYK JPEG", cmyk_jpeg, None),
    ImageCase("EXIF-rotated JPEG", exif_rotated_jpeg, None),
    ImageCase("1x1 image", one_pixel, None),
    ImageCase("10000x100 image", very_wide, None),
)


def image_corpus(folder: Path, good: int = 3, skip: bool | None = None) -> dict[str, Path]:
    """The image cases (all; ``skip=True``: only broken ones; ``False``: only valid-unusual ones) plus
    ``good`` ordinary JPEGs in ``folder``: {case name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {case.name: case.build(folder) for case in IMAGE_CASES if skip is None or bool(case.skip) == skip}
    for i in range(good):
        paths[f"good {i}"] = good_jpeg(folder, f"good{i}.jpg", seed=100 + i)
    return paths


# --------------------------------------------------------------------------- tensors, lists, dumps


def wrong_size_bin(folder: Path, name: str = "wrong_size.bin") -> Path:
    """A float32 tensor file 1000 bytes long (not 3*H*W*4)."""
    path = folder / name
    path.write_bytes(np.zeros(250, np.float32).tobytes())
    return path


def info_missing_field(path: Path, good_lines: list[str]) -> Path:
    """An .info whose third line lacks the height field."""
    lines = list(good_lines)
    parts = lines[min(2, len(lines) - 1)].split()
    lines.insert(2, " ".join(parts[:3]).replace(parts[0], "99", 1))
    path.write_text("\n".join(lines) + "\n")
    return path


def info_missing_path(path: Path, good_lines: list[str], missing: Path) -> Path:
    """An .info with one extra line whose file does not exist."""
    w, h = good_lines[0].split()[-2:]
    path.write_text("\n".join([*good_lines, f"{len(good_lines)} {missing} {w} {h}"]) + "\n")
    return path


def nonfinite_dump(folder: Path, stem: str, value: float) -> tuple[Path, Path]:
    """A dump pair whose dets hold ``value`` (NaN or inf) in a kept row."""
    from fcos_offline.data.dumps import write_dumps

    labels = np.full(100, -1, np.int64)
    dets = np.zeros((100, 5), np.float32)
    labels[:2] = [0, 2]
    dets[:2] = [[10, 10, 50, 40, 0.9], [20, 20, 60, value, 0.8]]
    return write_dumps(folder, stem, labels, dets)


# --------------------------------------------------------------------------- annotations


def annotation_json(images: dict[str, tuple[int, int]], seed: int = 0) -> dict:
    """COCO instances for ``{file_name: (width, height)}``: two boxes per image, COCO ids 1 and 3."""
    rng = np.random.default_rng(seed)
    data: dict = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
    }
    ann_id = 1
    for image_id, (name, (w, h)) in enumerate(sorted(images.items()), start=1):
        data["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for cat in (1, 3):
            bw, bh = max(1.0, w * float(rng.uniform(0.2, 0.5))), max(1.0, h * float(rng.uniform(0.2, 0.5)))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            data["annotations"].append(
                {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0}
            )
            ann_id += 1
    return data


def ann_image_without_file(data: dict, file_name: str = "no_such_image.jpg") -> dict:
    """``data`` plus an annotated image whose file does not exist."""
    out = json.loads(json.dumps(data))
    new_id = max(i["id"] for i in out["images"]) + 1
    out["images"].append({"id": new_id, "file_name": file_name, "width": 96, "height": 72})
    out["annotations"].append({"id": 10**6, "image_id": new_id, "category_id": 1, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0})
    return out


def ann_unknown_category(data: dict, cat_id: int = 999, name: str = "unicorn") -> dict:
    """``data`` plus a category (with one box) that no COCO-80 model predicts."""
    out = json.loads(json.dumps(data))
    out["categories"].append({"id": cat_id, "name": name, "supercategory": "myth"})
    first = out["images"][0]
    out["annotations"].append({"id": 10**6 + 1, "image_id": first["id"], "category_id": cat_id, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0})
    return out


def ann_empty_annotations(data: dict) -> dict:
    out = json.loads(json.dumps(data))
    out["annotations"] = []
    return out


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- models


def tiny_network(num_classes: int = 80, seed: int = 11):
    """A random-weight FCOS small enough for CPU tests (128x192 canvas)."""
    from conftest import make_fcos

    return make_fcos(seed=seed, calib_shape=CANVAS, stem=4, planes=(4, 8, 16, 32), fpn=16, stacked_convs=1, num_classes=num_classes)


def tiny_model(folder: Path) -> SimpleNamespace:
    """:func:`tiny_network` as an mmdet checkpoint and a dynamic-batch ONNX, built once per folder."""
    from conftest import save_mmdet_ckpt

    from fcos_offline.export.onnx_export import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    ckpt, onnx_path = folder / "tiny.pth", folder / "tiny.onnx"
    if not (ckpt.is_file() and onnx_path.is_file()):
        network = tiny_network()
        save_mmdet_ckpt(network, ckpt)
        export_onnx(network, onnx_path, CANVAS, dynamic_batch=True, verify=False)
    return SimpleNamespace(ckpt=ckpt, onnx=onnx_path, root=folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """The tiny model (``.ckpt``, ``.onnx``), shared by every reliability module through the disk."""
    return tiny_model(tmp_path_factory.getbasetemp() / "reliability_tiny_model")


def image_sizes(paths) -> dict[str, tuple[int, int]]:
    """{file name: (width, height)} as decoded; unreadable files get 96x72."""
    from fcos_offline.data.preprocess import read_image
    from fcos_offline.errors import BadFileError

    sizes = {}
    for p in paths:
        try:
            img = read_image(p)
            sizes[Path(p).name] = (img.shape[1], img.shape[0])
        except BadFileError:
            sizes[Path(p).name] = (96, 72)
    return sizes


def resnet_checkpoint(folder: Path, name: str = "resnet.pth") -> Path:
    """A plain classification ResNet state dict (conv1/layerN/fc keys, no FPN or head)."""
    import torch
    from conftest import fcos_config

    from fcos_offline.model.backbone import ResNet

    sd = dict(ResNet(fcos_config(stem=4, planes=(4, 8, 16, 32)).backbone).state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)
    path = folder / name
    torch.save(sd, path)
    return path


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_running_pickle(folder: Path, marker: Path, name: str = "evil.pth") -> Path:
    """A checkpoint whose meta holds an object that would run ``touch MARKER`` when unpickled."""
    import torch

    network = tiny_network()
    path = folder / name
    torch.save({"state_dict": network.state_dict(), "meta": {"hook": _RunsShell(marker)}}, path)
    return path


def onnx_renamed(src: Path, folder: Path, name: str = "renamed.onnx") -> Path:
    """The same detector with input 'images' and outputs 'out_classes', 'out_boxes' (in that order)."""
    import onnx

    model = onnx.load(str(src))
    renames = {"input": "images", "dets": "out_boxes", "labels": "out_classes"}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(model.graph.input) + list(model.graph.output):
        value.name = renames.get(value.name, value.name)
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(reversed(outputs))  # labels first: names and order both differ
    del model.metadata_props[:]  # a file we did not export: no fcos_offline metadata
    onnx.checker.check_model(model)
    path = folder / name
    onnx.save(model, str(path))
    return path


def onnx_foreign(folder: Path, name: str = "classifier.onnx") -> Path:
    """A one-input, one-output graph that is no detector: x [1,3,H,W] -> probs [1,3]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Softmax", ["flat"], ["probs"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *CANVAS])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / name
    onnx.save(model, str(path))
    return path


def dump_files(folder: Path) -> dict[str, bytes]:
    """Every dump file of a folder by name (temporary ``.part`` files excluded)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.suffix in (".bin", ".npy") and not re.search(r"\.part\d*$", p.name)}
