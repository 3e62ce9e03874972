"""The results table (the recipe's, filled in), ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from fcos_offline.io import atomic_write_bytes, atomic_write_json, translate_os_error


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per offline configuration, paired with the online run of the same batch size."""
    online = {e["batch_size"]: e for e in entries if e["mode"] == "online"}
    offline = [e for e in entries if e["mode"] == "offline"] or [e for e in entries if e["mode"] == "online"]
    rows = []
    for e in offline:
        on = online.get(e["batch_size"])
        rows.append(
            {
                "model": f"{e['engine']} {e['precision']} bs{e['batch_size']}",
                "online_mAP": on["bbox_mAP"] if on else None,
                "offline_mAP": e["bbox_mAP"],
                "delta_mAP": (e["bbox_mAP"] - on["bbox_mAP"]) if on else None,
                "AP50": e["bbox_mAP_50"],
                "AP75": e["bbox_mAP_75"],
                "online_fps": on["fps"] if on else None,
                "offline_fps": e["fps"],
                "p50_ms": e["latency_ms_p50"],
                "p99_ms": e["latency_ms_p99"],
                "dumps": e["dumps"],
            }
        )
    return rows


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The recipe's results table, filled in (mAP in percent), for a rich console to print."""
    t = Table(title=title)
    for col in ("model", "online mAP (PyTorch)", "offline mAP (engine)", "Δ mAP", "AP50", "AP75", "online fps", "offline fps", "p50 ms", "p99 ms"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(
            r["model"],
            _pct(r["online_mAP"]),
            _pct(r["offline_mAP"]),
            "—" if r["delta_mAP"] is None else f"{100 * r['delta_mAP']:+.2f}",
            _pct(r["AP50"]),
            _pct(r["AP75"]),
            "—" if r["online_fps"] is None else f"{r['online_fps']:.2f}",
            f"{r['offline_fps']:.2f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
        )
    return t


def _markdown(rows: list[dict[str, Any]], context: dict[str, Any], plots: dict[str, str], vis: list[str]) -> str:
    verify = context["export"].get("verify")
    check = f"{verify['match_rate']:.2%} of PyTorch's detections matched by ONNX Runtime" if verify else "not run"
    lines = [
        "# fcos-offline run report",
        "",
        f"- checkpoint: `{context['checkpoint']}`{' (embedded demo)' if context['demo'] else ''}",
        f"- data: `{context['images']}` ({context['num_images']} images), annotations `{context['annotations']}`",
        f"- input canvas: {context['shape'][0]}x{context['shape'][1]}; inputs {'streamed from images' if context['streaming'] else 'from .bin files'}",
        f"- ONNX: `{context['onnx']}`; export check: {check}",
        f"- machine: {context['cpu']} ({context['cores']} cores); versions: " + ", ".join(f"{k} {v}" for k, v in context["versions"].items() if v),
        *_accelerator_lines(context.get("accelerator")),
        "",
        "| model | online mAP (PyTorch) | offline mAP (engine) | Δ mAP | AP50 | AP75 | online fps | offline fps | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "—" if r["delta_mAP"] is None else f"{100 * r['delta_mAP']:+.2f}"
        online_fps = "—" if r["online_fps"] is None else f"{r['online_fps']:.2f}"
        lines.append(
            f"| {r['model']} | {_pct(r['online_mAP'])} | {_pct(r['offline_mAP'])} | {delta} | {_pct(r['AP50'])} | "
            f"{_pct(r['AP75'])} | {online_fps} | {r['offline_fps']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    lines += [
        "",
        "mAP in percent here; report.json stores fractions. fps = images/s end to end (decode, preprocess, "
        "inference, dump writing); p50/p99 = per-image end-to-end latency.",
        "",
    ]
    for name, path in plots.items():
        lines += [f"## {name}", "", f"![{name}]({path})", ""]
    if vis:
        lines += ["## detections", ""] + [f"![{Path(v).stem}]({v})" for v in vis] + [""]
    if context.get("compare"):
        lines += compare_section(context["compare"])
    return "\n".join(lines)


def compare_section(c: dict[str, Any]) -> list[str]:
    """``report.md``'s section for ``run --compare`` (offline vs online dumps, from compare.json)."""
    o = c["overall"]
    lines = [
        "## compare: offline vs online",
        "",
        f"A (online, the reference): `{c['a']['path']}`; B (offline): `{c['b']['path']}`.",
        "",
        f"- {o['images']} images: {o['matched']} of {o['detections_a']} / {o['detections_b']} detections matched "
        f"(same label, IoU >= {o['iou_thr']:g}; {100 * o['match_rate']:.2f}%), only in A {o['only_a']}, only in B {o['only_b']}",
        f"- score error max {o['score_err_max']:.2e} (p99 {o['score_err_p99']:.2e}); box error max {o['box_err_px_max']:.2f} px "
        f"(p99 {o['box_err_px_p99']:.2f})",
        f"- {'within' if c['within_tolerance'] else 'NOT within'} tolerance (compare.json has every image)",
    ]
    worst = c.get("worst") or []
    if worst:
        lines += ["", "| image | A | B | matched | only A | only B | max Δscore | max Δbox px |", "|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {w['stem']} | {w['num_a']} | {w['num_b']} | {w['matched']} | {w['only_a']} | {w['only_b']} | "
            f"{w['max_score_err']:.2e} | {w['max_box_err']:.2f} |"
            for w in worst[:10]
        ]
    return [*lines, ""]


def _plot(plot, data: Any, out_png: Path, *args: Any) -> str:
    """Draw one plot via a temporary name (a kill never leaves a torn PNG); a write failure (full disk)
    removes the partial file and is one clear error."""
    tmp = out_png.with_name(f"{out_png.stem}.part{os.getpid()}{out_png.suffix}")
    try:
        plot(data, tmp, *args)
        os.replace(tmp, out_png)
        return out_png.name
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise translate_os_error(out_png, exc) from None


def write_report(root: Path, entries: list[dict[str, Any]], context: dict[str, Any], vis_images: int = 4) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and PNG plots in ``root``; returns the report (its ``table`` rows included)."""
    from fcos_offline.report.plots import plot_classwise_ap, plot_pr_curves, plot_speed

    rows = table_rows(entries)
    plots: dict[str, str] = {}
    reference = next((e for e in entries if e["mode"] == "offline"), entries[0])
    eval_dir = Path(reference["eval"])
    summary = json.loads((eval_dir / "summary.json").read_text())
    tag = f"{reference['engine']} bs{reference['batch_size']}"
    if (eval_dir / "pr_curves.json").is_file():
        plots["PR curves (IoU 0.5)"] = _plot(plot_pr_curves, eval_dir / "pr_curves.json", root / "pr_curves.png", f"PR curves, {tag}")
    plots["per-class AP"] = _plot(plot_classwise_ap, summary.get("classwise", []), root / "classwise_ap.png", f"per-class AP, {tag}")
    plots["throughput"] = _plot(plot_speed, entries, root / "speed.png")
    vis_out = root / "detections"
    vis = []
    for e in entries:
        src = Path(e["eval"]) / "vis"
        if src.is_dir():
            vis_out.mkdir(exist_ok=True)
            for f in sorted(src.glob("*.jpg"))[:vis_images]:
                atomic_write_bytes(vis_out / f.name, f.read_bytes())
                vis.append(f"detections/{f.name}")
            break
    report = {
        **{k: v for k, v in context.items()},
        "entries": entries,
        "table": rows,
        "classwise": summary.get("classwise", []),
        "plots": list(plots.values()),
        "detections": vis,
    }
    atomic_write_json(root / "report.json", report)
    atomic_write_bytes(root / "report.md", _markdown(rows, context, plots, vis).encode())
    return report


def _accelerator_lines(acc: dict[str, Any] | None) -> list[str]:
    """The GPU the run used, as report.md names it (nothing for a CPU run)."""
    if not acc:
        return []
    return [
        f"- device: {acc.get('device')} = {acc.get('gpu')} (compute {acc.get('capability')}, {acc.get('memory_gib')} GiB); "
        f"CUDA {acc.get('cuda')}, cuDNN {acc.get('cudnn')}, driver {acc.get('driver')}, torch {acc.get('torch')}"
    ]
