"""Benchmark perf files: our writer, our parser, and the recipe's parse.py reading of them."""

import json
import re

import pytest

from fcos_offline.cli import main
from fcos_offline.data.perf import PerfStats, parse_file, parse_perf, recipe_fps, write_perf_file
from fcos_offline.errors import FcosError

# result/perf_vision_batchsize_1_device_0.txt as printed in an Ascend ModelZoo README
BENCHMARK_OUTPUT = (
    "[e2e] throughputRate: 243.034, latency: 205733\n"
    "[data read] throughputRate: 258.963, moduleLatency: 3.86155\n"
    "[preprocess] throughputRate: 258.404, moduleLatency: 3.86991\n"
    "[infer] throughputRate: 244.435, Interface throughputRate: 382.328, moduleLatency: 3.35758\n"
    "[post] throughputRate: 244.435, moduleLatency: 4.09107\n"
)


def _recipe_parse_script_fps(text: str) -> float:
    """What ACL_PyTorch test/parse.py computes: comma-join lines, ':(.*?),' matches, number 7, x4."""
    matches = [m.strip() for m in re.findall(r":(.*?),", text.replace("\n", ",") + ",")]
    return float(matches[7].replace("samples/s", "")) * 4


def test_recipe_reading_of_real_benchmark_output(tmp_path):
    path = tmp_path / "perf_vision_batchsize_1_device_0.txt"
    path.write_text(BENCHMARK_OUTPUT)
    parsed = parse_perf(path)
    assert parsed["interface_fps"] == 382.328 and parsed["e2e_fps"] == 243.034
    assert parsed["recipe_fps"] == pytest.approx(1529.312) == _recipe_parse_script_fps(BENCHMARK_OUTPUT)
    assert parsed["batch_size"] == 1
    assert parsed["stages"]["data read"] == {"throughputRate": 258.963, "moduleLatency": 3.86155}


def test_write_then_parse_round_trip(tmp_path, capsys):
    stats = PerfStats(
        batch_size=16,
        e2e_fps=38.2994,
        e2e_latency_ms=130550.25,
        interface_fps=41.5,
        infer_fps=39.75,
        infer_latency_ms=385.5421,
        read_fps=400.0,
        read_latency_ms=2.5,
        preprocess_fps=61.0,
        preprocess_latency_ms=16.39,
        post_fps=120.0,
        post_latency_ms=8.3333,
    )
    path = write_perf_file(tmp_path, stats)
    assert path.name == "perf_vision_batchsize_16_device_0.txt"
    text = path.read_text()
    lines = text.splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == ["[e2e]", "[data read]", "[preprocess]", "[infer]", "[post]"]
    assert lines[3] == "[infer] throughputRate: 39.75, Interface throughputRate: 41.5, moduleLatency: 385.542"
    parsed = parse_perf(path)
    assert parsed["batch_size"] == 16
    assert parsed["interface_fps"] == pytest.approx(stats.interface_fps)
    assert parsed["stages"]["e2e"] == {"throughputRate": pytest.approx(38.299), "latency": pytest.approx(130550.25)}
    assert parsed["stages"]["post"]["moduleLatency"] == pytest.approx(8.333)
    # the recipe's own script reads the same fps from our file
    assert _recipe_parse_script_fps(text) == pytest.approx(4 * stats.interface_fps) == parsed["recipe_fps"]

    assert main(["parse", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # this machine's measured figure comes first; the recipe's x4 number only as the recipe's convention
    assert lines[1] == "measured, one device, batch 16: 41.500 img/s in the model (Interface throughputRate), 38.299 img/s end to end"
    assert lines[2].startswith("recipe's table convention (not a measurement): 310 bs16 fps:166.000 = Interface throughputRate x 4 chips")
    assert main(["parse", str(path), "--chips=1"]) == 0
    assert "310 bs16 fps:41.500" in capsys.readouterr().out


def test_newer_stage_names_accepted(tmp_path):
    text = BENCHMARK_OUTPUT.replace("[infer]", "[inference]").replace("[post]", "[postprocess]")
    path = tmp_path / "perf_vision_batchsize_4_device_1.txt"
    path.write_text(text)
    parsed = parse_perf(path)
    assert set(parsed["stages"]) == {"e2e", "data read", "preprocess", "infer", "post"}
    assert parsed["batch_size"] == 4 and parsed["interface_fps"] == 382.328
    assert recipe_fps(text, chips=1) == 382.328


def test_summary_json(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text(
        json.dumps(
            {
                "engine": {"backend": "onnxruntime", "precision": "fp32", "batch_size": 4, "threads": None},
                "throughput_fps": 12.5,
                "infer_fps": 20.0,
                "latency_ms": {"e2e": {"mean": 80.1, "p99": 95.0}, "infer": {"mean": 70.25}},
                "batch_size": 1,
                "unrelated": [1, 2],
            }
        )
    )
    parsed = parse_file(path)
    assert parsed["throughput_fps"] == 12.5 and "unrelated" not in parsed
    assert main(["parse", str(path)]) == 0
    out = capsys.readouterr().out
    assert "end-to-end throughput (batch size 1): 12.500 img/s (files in -> dumps out)" in out
    assert "engine throughput: 20.000 img/s (time inside the engine call only)" in out
    assert "engine: backend onnxruntime, precision fp32, batch_size 4\n" in out  # a count stays an integer; unset fields are left out
    assert "latency e2e: mean 80.100, p99 95.000 ms" in out and "latency infer: mean 70.250 ms" in out
    path.write_text(json.dumps({"bbox_mAP": 0.357, "bbox_mAP_50": 0.55}))
    assert main(["parse", str(path)]) == 0
    assert "bbox mAP 35.7  mAP_50 55.0  (percent)" in capsys.readouterr().out  # percent, as run and postprocess print it


def test_unknown_files_fail(tmp_path, capsys):
    bad_txt = tmp_path / "perf.txt"
    bad_txt.write_text("hello: world\n")
    with pytest.raises(FcosError, match="not a benchmark perf file"):
        parse_perf(bad_txt)
    bad_json = tmp_path / "x.json"
    bad_json.write_text(json.dumps({"something": 1}))
    assert main(["parse", str(bad_json)]) == 1
    assert main(["parse", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read" in capsys.readouterr().err
