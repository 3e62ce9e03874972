"""The results table (the recipe's, filled in), ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from fcos_offline.io import atomic_write_bytes, atomic_write_json, translate_os_error
from fcos_offline.units import percent, points


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
                "engine_img_per_s": e["engine_img_per_s"],
                "engine_spread_pct": e["engine_spread_pct"],
                "e2e_img_per_s": e["e2e_img_per_s"],
                "engine_ms_per_batch_p50": e["engine_ms_per_batch"]["median"],
                "engine_ms_per_batch_p90": e["engine_ms_per_batch"]["p90"],
                "engine_ms_per_batch_p99": e["engine_ms_per_batch"]["p99"],
                "online_engine_img_per_s": on["engine_img_per_s"] if on else None,
                "dumps": e["dumps"],
            }
        )
    return rows


def _speed(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" ±{spread:.0f}%" if spread is not None else "")


#: the results table's columns: header, and the cell of a row (mAP in percent, differences in points)
COLUMNS: list[tuple[str, Any]] = [
    ("model", lambda r: r["model"]),
    ("online mAP % (PyTorch)", lambda r: percent(r["online_mAP"])),
    ("offline mAP % (engine)", lambda r: percent(r["offline_mAP"])),
    ("Δ mAP (points)", lambda r: points(r["delta_mAP"])),
    ("AP50 %", lambda r: percent(r["AP50"])),
    ("AP75 %", lambda r: percent(r["AP75"])),
    ("engine img/s", lambda r: _speed(r["engine_img_per_s"], r["engine_spread_pct"])),
    ("end-to-end img/s", lambda r: _speed(r["e2e_img_per_s"])),
    ("engine ms/batch p50", lambda r: f"{r['engine_ms_per_batch_p50']:.1f}"),
    ("p90", lambda r: f"{r['engine_ms_per_batch_p90']:.1f}"),
    ("p99", lambda r: f"{r['engine_ms_per_batch_p99']:.1f}"),
    ("online engine img/s", lambda r: _speed(r["online_engine_img_per_s"])),
]

#: what the columns measure, under every results table (docs/measurement.md says more)
TABLE_NOTE = (
    "mAP in percent, Δ in points (B - A: offline - online); JSON holds fractions. engine img/s = images / time inside "
    "the engine call (± = how much its speed varies between five consecutive segments of the run); end-to-end img/s = images / wall time from the first "
    "file read to the last dump written (decode, preprocess, engine, dump writing); engine ms/batch = the engine "
    "call's latency per batch (service time), p50, p90 and p99."
)


def results_table(rows: list[dict[str, Any]], title: str, caption: str | None = None) -> Table:
    """The recipe's results table, filled in (mAP in percent), for a rich console to print."""
    t = Table(title=title, caption="\n".join(filter(None, [caption, TABLE_NOTE])), caption_justify="left")
    for col, _ in COLUMNS:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(*(cell(r) for _, cell in COLUMNS))
    return t


def _markdown(rows: list[dict[str, Any]], context: dict[str, Any], plots: dict[str, str], vis: list[str]) -> str:
    verify = context["export"].get("verify")
    check = f"{verify['match_rate']:.2%} of PyTorch's detections matched by ONNX Runtime" if verify else "not run"
    busy = (context.get("machine_load") or {}).get("note")
    lines = [
        "# fcos-offline run report",
        "",
        f"- checkpoint: `{context['checkpoint']}`{' (embedded demo)' if context['demo'] else ''}",
        f"- data: `{context['images']}` ({context['num_images']} images), annotations `{context['annotations']}`",
        f"- input canvas: {context['shape'][0]}x{context['shape'][1]}; inputs {'streamed from images' if context['streaming'] else 'from .bin files'}",
        f"- ONNX: `{context['onnx']}`; export check: {check}",
        f"- machine: {context['cpu']} ({context['cores']} cores); versions: " + ", ".join(f"{k} {v}" for k, v in context["versions"].items() if v),
        *_accelerator_lines(context.get("accelerator")),
        *([f"- **{busy}**"] if busy else []),
        "",
        "| " + " | ".join(col for col, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    lines += ["", TABLE_NOTE, ""]
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
