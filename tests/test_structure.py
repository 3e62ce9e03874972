"""The structure the code promises: every module imports alone, the library never imports the CLI,
one engine protocol drives dispatch, option precedence (flag > artifact > default), one artifact
schema, and the tune policy runs with no engine library installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import fcos_offline
from fcos_offline.engine.artifact import Artifact, read_artifact, write_artifact
from fcos_offline.engine.backends import BACKENDS, ENGINES, resolve_model
from fcos_offline.engine.base import EngineConfig, EngineOptions, resolve_options
from fcos_offline.errors import FcosError

PACKAGE = Path(fcos_offline.__file__).parent
MODULES = sorted(
    ".".join(("fcos_offline", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.name != "__main__.py"
)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module: str) -> None:
    """A fresh interpreter imports each module alone: no import cycle, no hidden import-order dependency."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_library_never_imports_the_cli() -> None:
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        bad = sorted(n for n in _imports(path) if n == "fcos_offline.cli" or n.startswith("fcos_offline.cli."))
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_the_library_never_prints_or_exits() -> None:
    """stdout belongs to the CLI: library code returns results (warnings and progress go to stderr
    through fcos_offline.progress) and raises FcosError instead of exiting."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else ""
                on_console = (
                    isinstance(f, ast.Attribute)
                    and f.attr == "print"
                    and isinstance(f.value, ast.Call)
                    and getattr(f.value.func, "id", "") == "Console"
                )
                if name in ("print", "sys.exit", "exit", "quit") or on_console:
                    offenders.append(f"{rel}:{node.lineno} {name or 'Console().print'}")
    assert not offenders, offenders


def test_engine_layer_does_not_import_evaluation_and_export_does_not_either() -> None:
    """Dump and perf formats live in data/, detection matching in model/: the engine and export stages stand alone."""
    for folder in ("engine", "export"):
        for path in (PACKAGE / folder).rglob("*.py"):
            bad = sorted(n for n in _imports(path) if n.startswith("fcos_offline.evaluate"))
            assert not bad, (path, bad)


#: the layers, lowest first: a package imports its own layer or below, never above. demo (synthetic data, the demo
#: model's trainer, which scores with evaluate) sits with engine/evaluate/export: only report, tune and the CLI use it.
LAYERS = (
    ("__init__", "errors", "io", "units", "progress", "cpu"),
    ("data", "model"),
    ("engine", "evaluate", "export", "demo", "render"),
    ("report", "tune", "compare"),
    ("cli", "__main__"),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
#: packages of one layer that import each other (known; the layer rule allows it, a cycle should not be):
#: tune scores with compare.outputs' agreement, compare reuses tune's conv groups and quantization sensitivity
KNOWN_CYCLES = {frozenset({"compare", "tune"})}


def _package_imports() -> dict[tuple[str, str], list[str]]:
    """(importer's top-level package or module, imported one) -> where, for every fcos_offline import (lazy ones too)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        mine = rel.parts[0].removesuffix(".py")
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "fcos_offline":
                continue
            theirs = parts[1] if len(parts) > 1 and parts[1] in LAYER_OF else "__init__"  # ``from fcos_offline import __version__``
            if theirs != mine:
                found.setdefault((mine, theirs), []).append(f"{rel}: {name}")
    return found


def test_every_package_has_a_layer() -> None:
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops == set(LAYER_OF), tops ^ set(LAYER_OF)


def test_nothing_imports_upward() -> None:
    """``cli -> report/tune/compare -> engine/evaluate/export/demo -> data/model -> io/errors/units/progress/cpu``
    (docs/architecture.md), lazy imports inside functions included."""
    upward = {f"{a} -> {b}": where for (a, b), where in _package_imports().items() if LAYER_OF[b] > LAYER_OF[a]}
    assert not upward, upward


def test_no_import_cycles_between_packages() -> None:
    pairs = _package_imports()
    cycles = {frozenset({a, b}) for a, b in pairs if (b, a) in pairs}
    assert cycles <= KNOWN_CYCLES, cycles - KNOWN_CYCLES


def test_every_verb_has_help_with_an_example(capsys) -> None:
    """--help teaches: every verb prints its usage and at least one example, and exits 0."""
    from fcos_offline.cli import _build_parser, main

    sub = next(a for a in _build_parser()._actions if a.dest == "verb")
    verbs = sorted(sub.choices)  # type: ignore[arg-type]
    assert {"inspect", "export", "preprocess", "get-info", "convert", "infer", "postprocess", "parse", "run", "tune", "compare"} <= set(verbs)
    for verb in verbs:
        capsys.readouterr()
        assert main([verb, "--help"]) == 0, verb
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fcos-offline {verb}") and "example" in out.lower(), verb
        assert any(line.startswith("  fcos-offline ") for line in out.splitlines()), verb  # examples kept line for line


def test_one_mapping_drives_dispatch_and_cli_choices() -> None:
    """Every backend provides the protocol; --engine's choices are the mapping's names."""
    from fcos_offline.cli import _build_parser

    for name, module in BACKENDS.items():
        assert module.NAME == name
        constants = ("EXTRA", "PRECISIONS", "CONVERT_PRECISIONS", "CONVERT_FROM", "MODEL_KINDS", "MODEL_SUFFIXES")
        for attr in (*constants, "available", "version", "convert", "load"):
            assert hasattr(module, attr), (name, attr)
    infer = _build_parser()._subparsers._group_actions[0].choices["infer"]  # type: ignore[union-attr]
    engine_action = next(a for a in infer._actions if "--engine" in a.option_strings)
    assert tuple(engine_action.choices) == ENGINES


def test_no_literal_engine_dispatch_outside_the_backends() -> None:
    """Engine names are compared nowhere but in the backend modules and the search space (no string dispatch)."""
    allowed = {Path("engine/backends"), Path("tune/space.py")}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if any(rel == a or a in rel.parents for a in allowed):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("openvino", "torch", "inductor") for c in [node.left, *node.comparators]
            ):
                pytest.fail(f"{rel}:{node.lineno} compares with an engine name")


# ---------------------------------------------------------------------------- options and artifacts


def test_precedence_flag_then_artifact_then_default() -> None:
    recorded = EngineOptions(engine="openvino", threads=2, precision="bf16", ort_opt_level="all")
    assert resolve_options(EngineOptions(), recorded) == EngineConfig(engine="openvino", threads=2, precision="bf16")
    mine = resolve_options(EngineOptions(threads=1, precision="fp16"), recorded)
    assert (mine.engine, mine.threads, mine.precision) == ("openvino", 1, "fp16")
    # an explicit value equal to the built-in default still wins over the artifact (the old bug)
    assert resolve_options(EngineOptions(precision="fp32"), recorded).precision == "fp32"
    assert resolve_options(EngineOptions(), None) == EngineConfig()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from conftest import make_fcos

    from fcos_offline.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("arch") / "tiny.onnx"
    export_onnx(make_fcos(seed=0, num_classes=3), path, shape=(64, 96), dynamic_batch=True)
    return path


def test_explicit_precision_fp32_overrides_a_tuned_bf16_artifact(tiny_onnx: Path, tmp_path: Path) -> None:
    """A tune artifact recorded bf16; ``infer --precision fp32`` must run fp32 (flag > artifact)."""
    pytest.importorskip("openvino")
    from fcos_offline.cli import main
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert

    art_dir = tmp_path / "tuned"
    art = convert(tiny_onnx, "openvino", art_dir, ConvertRequest(batch_size=1))
    write_artifact(art_dir, replace(art, tuned=True, engine_options=EngineOptions(engine="openvino", threads=1, precision="bf16")))
    images = tmp_path / "images"
    from fcos_offline.demo.synthetic import make_demo_data

    make_demo_data(tmp_path / "d", "val", 2, seed=3)
    images = tmp_path / "d" / "val2017"
    for flag, expected in ((["--precision", "fp32"], "fp32"), ([], "bf16")):
        out = tmp_path / f"dumps{len(flag)}"
        assert main(["infer", "--model", str(art_dir), "--images", str(images), "--output", str(out), "--workers", "0", *flag]) == 0
        engine = json.loads((out / "summary.json").read_text())["engine"]
        assert engine["precision"] == expected and engine["threads"] == 1, engine


def test_artifact_round_trip_and_schema_one(tmp_path: Path) -> None:
    art = Artifact(
        engine="onnxruntime",
        model_file="model.onnx",
        batch_size=4,
        input_shape=[4, 3, 64, 96],
        precision="int8",
        engine_version="1",
        source="x.onnx",
        engine_options=EngineOptions(threads=2),
        tuned=True,
        tuning={"map_drop": 0.1},
    )
    write_artifact(tmp_path, art)
    assert read_artifact(tmp_path) == art and read_artifact(tmp_path).canvas == (64, 96)
    # the pre-versioned tune writer: tune fields at the top level
    old = {
        "engine": "openvino",
        "engine_version": "2024",
        "batch_size": 1,
        "input_shape": [1, 3, 8, 8],
        "precision": "int8",
        "source": "s",
        "model_file": "model.xml",
        "post_file": None,
        "tuned": True,
        "map_drop": 0.2,
        "engine_options": {"threads": 2, "precision": "bf16", "ort_opt_level": "all", "inter_op_threads": None, "batch_size": 1},
    }
    (tmp_path / "artifact.json").write_text(json.dumps(old))
    got = read_artifact(tmp_path)
    assert got.engine_options == EngineOptions(threads=2, precision="bf16", ort_opt_level="all", batch_size=1)
    assert got.tuning["map_drop"] == 0.2 and got.schema == 2


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"engine": "onnxruntime"}', "missing model_file"),
        ('{"engine": "onnxruntime", "model_file": "../../etc/passwd", "batch_size": 1, "input_shape": [1,3,8,8]}', "file name inside"),
        ('{"engine": "onnxruntime", "model_file": "m.onnx", "batch_size": 0, "input_shape": [1,3,8,8]}', "batch_size"),
        ('{"schema": 99, "engine": "onnxruntime", "model_file": "m.onnx", "batch_size": 1, "input_shape": [1,3,8,8]}', "schema 99"),
        ("[]", "JSON object"),
    ],
)
def test_a_broken_artifact_is_one_line_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "artifact.json").write_text(text)
    with pytest.raises(FcosError, match=r"artifact\.json") as err:
        resolve_model(tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_engines_close_as_context_managers(tiny_onnx: Path) -> None:
    import numpy as np

    from fcos_offline.engine.backends import open_engine

    with open_engine(tiny_onnx) as engine:
        dets, labels = engine.run(np.zeros((1, 3, 64, 96), np.float32))
        assert dets.shape[0] == labels.shape[0] == 1 and engine.execution_precision() == "fp32"
    assert engine.session is None  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- tune policy without engines


def _trial(engine: str, build: str, ms: float, drop: float, groups: tuple[str, ...] = (), threads: int | None = None):
    from fcos_offline.tune.space import Candidate
    from fcos_offline.tune.store import Trial

    c = Candidate(engine, build, float_groups=groups, threads=threads)
    return Trial(
        candidate=c,
        label=c.label(),
        precision="int8" if c.quantized else "fp32",
        float_precision=None,
        threads_effective=threads or 2,
        float_nodes=[],
        bbox_mAP=0.5 - drop / 100,
        map_drop=drop,
        ms_per_img=ms,
        img_per_s=1000 / ms,
        bench_runs=3,
        speedup_vs_reference=100 / ms,
        size_mb=1.0,
        model="m",
        accuracy_from=c.key,
        within_budget=drop <= 0.3,
    )


def test_tune_policy_runs_without_openvino_or_nncf() -> None:
    """The policy modules import and decide with openvino and nncf made unimportable."""
    code = (
        "import sys; sys.modules['openvino'] = None; sys.modules['nncf'] = None\n"
        "import fcos_offline.tune.policy, fcos_offline.tune.space, fcos_offline.tune.store\n"
        "from fcos_offline.tune.space import Candidate, nncf_config\n"
        "assert nncf_config('mixed-bc-mm').preset == 'mixed'\n"
        "print(Candidate('openvino', 'nncf:performance').label())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "int8 nncf performance" in proc.stdout, proc.stderr[-2000:]


def test_choose_the_fastest_within_budget_and_say_why() -> None:
    from fcos_offline.tune import policy

    ref = _trial("onnxruntime", "fp32", 100.0, 0.0)
    fast_bad = _trial("openvino", "nncf:performance", 20.0, 1.5)
    ok = _trial("onnxruntime", "ort-qdq:u8s8-minmax-pc", 40.0, 0.2)
    slower_ok = _trial("openvino", "fp32", 60.0, 0.0)
    best, reason = policy.choose([ref, fast_bad, ok, slower_ok], 0.3, ref)
    assert best is ok and "fastest of 3" in reason and "faster but failing the check" in reason and "nncf" in reason
    assert policy.choose([ref, fast_bad], 0.3, ref)[0] is ref


def test_fallback_goes_to_each_over_budget_family_unless_something_as_fast_holds() -> None:
    from fcos_offline.tune import policy

    ref = _trial("onnxruntime", "fp32", 100.0, 0.0)
    ov = [_trial("openvino", "nncf:performance", 20.0, 1.0), _trial("openvino", "nncf:mixed-mm", 21.0, 0.6)]
    ort = [_trial("onnxruntime", "ort-qdq:u8s8-minmax-pc", 40.0, 0.9)]
    swept = _trial("openvino", "nncf:performance", 18.0, 1.0, threads=1)  # sweeps are not fallback bases
    bases = policy.fallback_bases([ref, *ov, *ort, swept])
    assert [b.key for b, _ in bases] == [ov[1].key, ort[0].key]  # fastest family first; its most accurate near-fastest
    assert policy.fallback_worthwhile([ref, *ov, *ort], ov)
    assert not policy.fallback_worthwhile([ref, _trial("openvino", "fp32", 21.0, 0.0), *ov], ov)
    assert policy.best_float_ms([ref, *ov]) == 100.0


def test_sweep_bases_and_finalists() -> None:
    from fcos_offline.tune import policy

    ref = _trial("onnxruntime", "fp32", 100.0, 0.0)
    a = _trial("openvino", "fp32", 50.0, 0.0)
    a2 = _trial("openvino", "fp32", 45.0, 0.0, threads=1)  # same accuracy id as a
    b = _trial("onnxruntime", "ort-qdq:u8s8-minmax-pc", 60.0, 0.1)
    assert [t.key for t in policy.sweep_bases([ref, a, a2, b], 2)] == [a2.key, b.key]
    a2.ms_per_img_first = 80.0  # re-timed faster than first measured: picked by the first measurement
    assert [t.key for t in policy.finalists([ref, a, a2, b], ref.key, 2)] == [a.key, b.key]


@pytest.mark.parametrize("build", ["int8", "ort-qdq:", "nncf:fast", "ort-qdq:u8s8-magic-pc", "fp32:x"])
def test_a_malformed_build_tag_is_refused(build: str) -> None:
    from fcos_offline.tune.space import Candidate, nncf_config, ort_config

    with pytest.raises(FcosError):
        c = Candidate("onnxruntime", build)
        (ort_config if c.kind == "ort-qdq" else nncf_config)(c.build.split(":", 1)[1])


def test_trial_records_round_trip() -> None:
    from fcos_offline.tune.store import Trial

    t = _trial("openvino", "nncf:performance-bc-mm", 20.0, 0.2, groups=("bbox_head.conv_cls",))
    data = json.loads(json.dumps(t.to_dict()))
    assert Trial.from_dict(data) == t and data["key"] == t.key and data["float_groups"] == ["bbox_head.conv_cls"]


def test_only_the_heads_name_a_heads_tensors() -> None:
    """Export, engines, tune, compare and the CLI ask a family's HeadSpec; none names a head conv itself
    (``conv_cls``, ``retina_cls``, ``atss_centerness``…). The heads, their descriptions and the checkpoint
    loader (which maps foreign key names onto them) may; so may the demo trainer, which trains an FCOS.
    Docstrings and comments may give examples."""
    import re

    from fcos_offline.model.heads.spec import SPECS

    names = {conv for spec in SPECS.values() for conv in (*spec.convs.values(), *spec.mmdet_renames)}
    word = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    allowed = ("model/heads/", "model/checkpoint.py", "demo/train.py")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith(allowed):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in names:
                offenders.append(f"{rel}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings and word.search(node.value):
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
