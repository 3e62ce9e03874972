"""Reliability: the parsers of untrusted text fuzzed with hypothesis.

.info lists, dump folders, perf files, summary.json files and COCO annotation JSON: whatever the
bytes, the parser returns a well-formed result or raises our own one-line error
(:class:`~fcos_offline.errors.FcosError` and subclasses) — never anything else.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from badinputs import record, reliability_log  # noqa: F401 - session fixture writing the reliability table
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fcos_offline.data.annotations import load_annotations
from fcos_offline.data.dumps import read_dumps
from fcos_offline.data.info import InfoEntry, read_info
from fcos_offline.data.perf import describe, parse_file
from fcos_offline.errors import FcosError
from fcos_offline.evaluate.coco import evaluate_bbox

#: examples per parser; FCOS_FUZZ_EXAMPLES=5000 for a long hunt
FUZZ = settings(max_examples=int(os.environ.get("FCOS_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES: dict[str, int] = {}


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="fcos-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _write(folder: Path, name: str, payload: bytes) -> Path:
    path = folder / name
    path.write_bytes(payload)
    return path


def _count(name: str) -> None:
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1


# --------------------------------------------------------------------------- .info


info_line = st.one_of(
    st.tuples(st.integers(-5, 10**6), st.text(min_size=0, max_size=20), st.integers(-10, 10**5), st.integers(-10, 10**5)).map(
        lambda t: f"{t[0]} {t[1]} {t[2]} {t[3]}"
    ),
    st.text(max_size=60),
)
info_bytes = st.one_of(
    st.lists(info_line, max_size=8).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
)


@FUZZ
@given(payload=info_bytes)
@example(payload=b"\xff\xfe\x00garbage")
@example(payload=b"0 a.jpg 10\n")
@example(payload="0 ٣.jpg ٣ ٤\n".encode())
@example(payload=b"0 x 1" + b"9" * 5000 + b" 5\n")
def test_read_info_fuzzed(scratch, payload) -> None:
    _count("info")
    path = _write(scratch, "list.info", payload)
    try:
        entries = read_info(path)
    except FcosError as exc:
        assert str(path) in str(exc)
        return
    for e in entries:
        assert isinstance(e, InfoEntry) and e.width > 0 and e.height > 0 and isinstance(e.path, str)


# --------------------------------------------------------------------------- dump folders


dump_name = st.one_of(
    st.sampled_from(
        [
            "a_1.bin",
            "a_2.bin",
            "a_0.bin",
            "b_1.bin",
            "b_2.bin",
            "_1.bin",
            "a.bin",
            "a_x.bin",
            "a_3.bin",
            "a_labels.npy",
            "a_dets.npy",
            "b_dets.npy",
            "c.npy",
            "a_1.bin.part7",
            "notes.txt",
        ]
    ),
    st.from_regex(r"[a-z]{1,3}_[0-9]{1,2}\.(bin|npy)", fullmatch=True),
)


def _dump_payload(draw_kind: int, rng_seed: int) -> bytes:
    rng = np.random.default_rng(rng_seed)
    if draw_kind == 0:
        return rng.integers(-3, 100, 100, dtype=np.int64).tobytes()  # labels-sized
    if draw_kind == 1:
        return rng.normal(0, 1e3, 500).astype(np.float32).tobytes()  # dets-sized
    if draw_kind == 2:
        dets = rng.normal(0, 10, (100, 5)).astype(np.float32)
        dets[rng.integers(0, 100), rng.integers(0, 5)] = rng.choice([np.nan, np.inf, -np.inf])
        return dets.tobytes()
    if draw_kind == 3:
        import io

        buf = io.BytesIO()
        shape = [(100,), (100, 5), (7,), (2, 2)][int(rng.integers(0, 4))]
        np.save(buf, rng.normal(0, 1, shape).astype(["<f4", "<i8", "<f8"][int(rng.integers(0, 3))]))
        return buf.getvalue()
    return rng.bytes(int(rng.integers(0, 2100)))


dump_files_strategy = st.dictionaries(dump_name, st.tuples(st.integers(0, 4), st.integers(0, 10**6)), max_size=6)


@FUZZ
@given(files=dump_files_strategy, net_out_num=st.sampled_from([None, None, 2, 3, 1, 0]))
def test_read_dumps_fuzzed(scratch, files, net_out_num) -> None:
    _count("dumps")
    folder = scratch / "dumps"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, (kind, seed) in files.items():
        _write(folder, name, _dump_payload(kind, seed))
    for skipped in (None, []):
        try:
            result = read_dumps(folder, net_out_num=net_out_num, skipped=skipped)
        except FcosError:
            continue
        for stem, (labels, dets) in result.items():
            assert labels.shape == (100,) and labels.dtype == np.int64
            assert dets.shape == (100, 5) and dets.dtype == np.float32 and np.isfinite(dets).all()
        if skipped is not None:
            assert all(isinstance(e, FcosError) for e in skipped)


# --------------------------------------------------------------------------- perf files and summary.json

perf_line = st.one_of(
    st.sampled_from(
        [
            "[e2e] throughputRate: 243.034, latency: 205733",
            "[data read] throughputRate: 258.963, moduleLatency: 3.86155",
            "[infer] throughputRate: 244.435, Interface throughputRate: 382.328, moduleLatency: 3.35758",
            "[inference] throughputRate: 1e999, Interface throughputRate: -0, moduleLatency: nan",
            "[post] throughputRate: ٣٤, moduleLatency: 4.09107",
            "[infer] Interface throughputRate:, moduleLatency: 3",
        ]
    ),
    st.tuples(st.text(max_size=12), st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=4)).map(
        lambda t: f"[{t[0]}] " + ", ".join(f"{k}: {v}" for k, v in t[1])
    ),
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
summary_objects = st.fixed_dictionaries(
    {},
    optional={
        k: json_values for k in ("engine", "batch_size", "throughput_fps", "infer_fps", "latency_ms", "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75")
    },
)


@FUZZ
@given(lines=st.lists(perf_line, max_size=8), raw=st.binary(max_size=64), chips=st.integers(-2, 8), as_bytes=st.booleans())
def test_perf_file_fuzzed(scratch, lines, raw, chips, as_bytes) -> None:
    _count("perf")
    payload = raw if as_bytes else "\n".join(lines).encode("utf-8", "surrogatepass")
    path = _write(scratch, "perf_vision_batchsize_4_device_0.txt", payload)
    try:
        lines_out = describe(parse_file(path, chips=chips))
    except FcosError as exc:
        assert str(path) in str(exc) or "field" in str(exc)
        return
    assert all(isinstance(line, str) for line in lines_out)


@FUZZ
@given(obj=st.one_of(summary_objects, json_values), raw=st.binary(max_size=32), as_bytes=st.booleans())
def test_summary_json_fuzzed(scratch, obj, raw, as_bytes) -> None:
    _count("summary")
    payload = raw if as_bytes else json.dumps(obj).encode()
    path = _write(scratch, "summary.json", payload)
    try:
        lines_out = describe(parse_file(path))
    except FcosError as exc:
        assert str(path) in str(exc)
        return
    assert all(isinstance(line, str) for line in lines_out)


# --------------------------------------------------------------------------- annotation JSON

VALID = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}, {"id": 2, "file_name": "b.jpg", "width": 64, "height": 64}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
}
RESULTS = [
    {"image_id": 1, "bbox": [10, 10, 30, 20], "score": 0.9, "category_id": 1},
    {"image_id": 2, "bbox": [4, 4, 20, 20], "score": 0.8, "category_id": 3},
]
PATHS = [
    ("images",),
    ("annotations",),
    ("categories",),
    ("images", 0),
    ("images", 0, "id"),
    ("images", 0, "file_name"),
    ("images", 1, "id"),
    ("annotations", 0),
    ("annotations", 0, "bbox"),
    ("annotations", 0, "bbox", 2),
    ("annotations", 0, "image_id"),
    ("annotations", 0, "category_id"),
    ("annotations", 0, "area"),
    ("annotations", 0, "iscrowd"),
    ("annotations", 1, "id"),
    ("categories", 0),
    ("categories", 0, "id"),
    ("categories", 1, "name"),
    (),
]


@st.composite
def mutated_instances(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        value = draw(
            st.one_of(
                json_values,
                st.just([]),
                st.just({}),
                st.integers(-(2**70), 2**70),
                st.sampled_from([float("nan"), float("inf"), -1, 0, True, "x", [1, 2, 3]]),
            )
        )
        action = draw(st.sampled_from(["set", "delete", "duplicate"]))
        if not path:
            data = value if action == "set" else data
            continue
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "set":
                parent[path[-1]] = value
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, list) and isinstance(path[-1], int):
                parent.append(copy.deepcopy(parent[path[-1]]))
        except (KeyError, IndexError, TypeError):
            pass
    return data


@FUZZ
@given(data=st.one_of(mutated_instances(), json_values), raw=st.binary(max_size=40), as_bytes=st.booleans())
@example(data=VALID, raw=b"", as_bytes=False)
@example(data=None, raw=b"\xff\xfe{", as_bytes=True)
def test_annotation_json_fuzzed(scratch, data, raw, as_bytes) -> None:
    """load_annotations accepts it or says why in one line; what it accepts, COCO evaluation can use."""
    _count("annotations")
    try:
        payload = raw if as_bytes else json.dumps(data, allow_nan=True).encode()
    except (ValueError, RecursionError):
        assume(False)
    path = _write(scratch, "instances.json", payload)
    try:
        loaded = load_annotations(path)
    except FcosError as exc:
        assert str(path) in str(exc)
        return
    image_ids = {i["id"] for i in loaded["images"]}
    results = [r for r in RESULTS if r["image_id"] in image_ids]
    metrics = evaluate_bbox(loaded, results)
    assert len(metrics["stats"]) == 12


@pytest.fixture(scope="module", autouse=True)
def _record_fuzzing():
    yield
    for name, verbs, what, parser in (
        ("info", ("infer", "postprocess"), ".info file (fuzzed bytes)", "read_info"),
        ("dumps", ("postprocess",), "dump folder (fuzzed names and bytes)", "read_dumps"),
        ("perf", ("parse",), "perf file (fuzzed)", "parse_perf + describe"),
        ("summary", ("parse",), "summary.json (fuzzed)", "parse_summary + describe"),
        ("annotations", ("postprocess", "run"), "annotation JSON (fuzzed and mutated)", "load_annotations + evaluate_bbox"),
    ):
        for verb in verbs:
            if EXAMPLES.get(name):
                record(
                    what,
                    verb,
                    None,
                    "",
                    f"{parser}: {EXAMPLES[name]} hypothesis examples, each a well-formed "
                    "result or one FcosError line naming the file, never another exception",
                )
