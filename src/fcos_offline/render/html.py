"""Self-contained ``report.html`` pages for ``run``, ``compare`` and ``tune``.

One file each: CSS, JavaScript, data and pictures inline (images as JPEG data URIs), so the page
opens from ``file://`` with no network. Boxes are drawn by the page (SVG over each picture) from
the embedded detections, which is what lets the image browser filter by class and error kind.
A script error anywhere sets ``data-errors`` on ``<body>`` (the browser test reads it).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.io import atomic_write_bytes
from fcos_offline.units import percent, points

#: the longest side of a picture embedded in the image browser (pixels)
THUMB_SIDE = 560
#: error kinds, their colours and what they mean (the legend; the same names as evaluate.errors)
KINDS: dict[str, tuple[str, str]] = {
    "tp": ("#2ca02c", "true positive"),
    "cls": ("#ff7f0e", "right place, wrong class"),
    "loc": ("#e6c229", "right class, box off (0.1 <= IoU < 0.5)"),
    "both": ("#9467bd", "wrong class and box off"),
    "dupe": ("#17becf", "duplicate of a detected object"),
    "bkg": ("#d62728", "on background (IoU < 0.1 with everything)"),
    "missed": ("#e377c2", "object missed (TIDE's: unmatched and not the target of any Cls or Loc error, at any score)"),
    "undetected": ("#f7b6d2", "object not detected at the operating score (a weaker or wrong detection covers it)"),
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{font-size:20px;margin:0}header p{margin:4px 0 0;color:#c9cfdb}
main{padding:8px 24px 40px;max-width:1400px}section{background:#fff;border:1px solid #e2e5ea;border-radius:6px;margin:16px 0;padding:12px 16px}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}th{background:#f0f2f5;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left}th.sorted-asc:after{content:" \\25B2"}th.sorted-desc:after{content:" \\25BC"}
.note{color:#5b6475;font-size:13px;max-width:1000px}.bar{height:14px;background:#4c78a8;display:inline-block;vertical-align:middle}
.cm td{text-align:center;min-width:28px}.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e2e5ea;border-radius:4px;padding:6px;width:372px}
.card svg{width:360px;height:auto;display:block;background:#222}.card p{margin:4px 0 0;font-size:12px;color:#5b6475;overflow-wrap:anywhere}
.controls select,.controls label{margin-right:12px}.pair{display:flex;gap:6px}.pair .card{width:auto}
"""

_JS = """
window.addEventListener('error',function(e){document.body.dataset.errors=(document.body.dataset.errors||'')+e.message+';'});
function sortable(t){var ths=t.querySelectorAll('th');ths.forEach(function(th,i){th.addEventListener('click',function(){
 var asc=!th.classList.contains('sorted-asc');ths.forEach(function(x){x.classList.remove('sorted-asc','sorted-desc')});
 th.classList.add(asc?'sorted-asc':'sorted-desc');var body=t.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;var nx=parseFloat(x),ny=parseFloat(y);
  var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;return asc?c:-c});rows.forEach(function(r){body.appendChild(r)})})})}
document.querySelectorAll('table.sortable').forEach(sortable);
var DATA=JSON.parse(document.getElementById('data').textContent);
function el(tag,attrs){var e=document.createElementNS('http://www.w3.org/2000/svg',tag);for(var k in attrs){e.setAttribute(k,attrs[k])}return e}
function picture(img,boxes,filter){var svg=el('svg',{viewBox:'0 0 '+img.width+' '+img.height});
 svg.appendChild(el('image',{href:img.src,x:0,y:0,width:img.width,height:img.height}));
 var lw=Math.max(1.5,Math.max(img.width,img.height)/300);
 boxes.forEach(function(b){if(filter&&!filter(b))return;var r=el('rect',{x:b.bbox[0],y:b.bbox[1],width:Math.max(b.bbox[2],0.5),height:Math.max(b.bbox[3],0.5),
  fill:'none',stroke:b.colour,'stroke-width':lw});if(b.dashed)r.setAttribute('stroke-dasharray',(3*lw)+','+(2*lw));svg.appendChild(r);
  if(b.text){var t=el('text',{x:b.bbox[0]+lw,y:Math.max(b.bbox[1]-lw,10*lw),fill:b.colour,'font-size':9*lw,'font-family':'sans-serif',
   stroke:'#000','stroke-width':lw/3,'paint-order':'stroke'});t.textContent=b.text;svg.appendChild(t)}});return svg}
function browser(){var root=document.getElementById('browser');if(!root||!DATA.browser)return;var B=DATA.browser;
 var cls=document.getElementById('f-class'),kind=document.getElementById('f-kind'),grid=root.querySelector('.grid');
 function draw(){grid.innerHTML='';var c=cls.value,k=kind.value,shown=0;
  B.images.forEach(function(im){var boxes=[];im.gt.forEach(function(g){var k=g.detected?'gt':(g.error==='missed'?'missed':'undetected');
    boxes.push({bbox:g.bbox,colour:k==='gt'?'#ffffff':B.kinds[k],dashed:true,kind:k,name:g.name,text:k==='gt'?'':k+' '+g.name})});
   im.dets.forEach(function(d){boxes.push({bbox:d.bbox,colour:B.kinds[d.kind],kind:d.kind,name:d.name,text:d.name+' '+d.score.toFixed(2)})});
   var f=function(b){return (c==='all'||b.name===c)&&(k==='all'||b.kind===k||b.kind==='gt')};
   var hits=boxes.filter(function(b){return f(b)&&b.kind!=='gt'});if((c!=='all'||k!=='all')&&hits.length===0)return;
   var card=document.createElement('div');card.className='card';card.appendChild(picture(im,boxes,f));
   var p=document.createElement('p');p.textContent=im.file_name+' \\u00b7 AP50 '+(im.ap===null?'\\u2014 (no objects)':(100*im.ap).toFixed(1)+'%')+
    ' \\u00b7 '+im.dets.length+' detections, '+im.gt.filter(function(g){return !g.crowd}).length+' objects';card.appendChild(p);grid.appendChild(card);shown++});
  document.getElementById('shown').textContent=shown+' of '+B.images.length+' images'}
 cls.addEventListener('change',draw);kind.addEventListener('change',draw);draw()}
function pairs(){var root=document.getElementById('pairs');if(!root||!DATA.pairs)return;var P=DATA.pairs;
 P.images.forEach(function(im){var row=document.createElement('div');row.className='pair';
  ['a','b'].forEach(function(side){var card=document.createElement('div');card.className='card';
   card.appendChild(picture(im,im[side].map(function(d){return {bbox:d.bbox,colour:d.differs?'#d62728':'#2ca02c',text:d.name+' '+d.score.toFixed(2)}})));
   var p=document.createElement('p');p.textContent=P.names[side]+': '+im[side].filter(function(d){return d.differs}).length+' of '+im[side].length+' detections differ';
   card.appendChild(p);row.appendChild(card)});var cap=document.createElement('p');cap.className='note';cap.textContent=im.file_name;
  root.appendChild(cap);root.appendChild(row)})}
browser();pairs();
"""


def _json_for_script(data: Any) -> str:
    """JSON safe inside ``<script>`` (no ``</script>`` can close it early)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def page(title: str, subtitle: str, sections: Sequence[str], data: dict[str, Any]) -> str:
    """A whole self-contained page: ``sections`` are HTML fragments, ``data`` what the script draws from."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{''.join(sections)}</main><script type='application/json' id='data'>{_json_for_script(data)}</script>"
        f"<script>{_JS}</script></body></html>"
    )


def section(heading: str, body: str, note: str = "", anchor: str = "") -> str:
    """One titled panel."""
    ident = f" id='{html.escape(anchor)}'" if anchor else ""
    text = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"<section{ident}><h2>{html.escape(heading)}</h2>{text}{body}</section>"


def table(columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any], Callable[[Any], str]]], rows: Sequence[dict[str, Any]]) -> str:
    """A sortable table: per column its header, the raw value of a row (sort key) and how the value reads."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in columns)
    body = []
    for row in rows:
        cells = []
        for _, get, fmt in columns:
            value = get(row)
            key = "" if value is None else value
            cells.append(f"<td data-v='{html.escape(str(key))}'>{html.escape(fmt(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<div style='overflow:auto'><table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _pct(v: Any) -> str:
    return percent(v) if v is not None else "—"


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: "—" if v is None else f"{v:.{digits}f}"


def _text(v: Any) -> str:
    return "—" if v is None else str(v)


def bars(values: dict[str, float | None], labels: dict[str, str], unit: str = "points") -> str:
    """Horizontal bars, largest first (ΔAP in points); None reads "—" (undefined) and has no bar."""
    top = max([abs(v) for v in values.values() if v is not None] + [1e-9])
    rows = []
    for key, v in sorted(values.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1e9)):
        colour = KINDS.get(key, ("#4c78a8", ""))[0]
        width = 0 if v is None else int(round(300 * abs(v) / top))
        figure = "—" if v is None else f"{v:+.2f} {unit}"
        rows.append(
            f"<tr><td>{html.escape(labels.get(key, key))}</td><td data-v='{'' if v is None else v}'>{figure}</td>"
            f"<td style='text-align:left'><span class='bar' style='width:{width}px;background:{colour}'></span></td></tr>"
        )
    return f"<table class='sortable'><thead><tr><th>error kind</th><th>ΔAP if fixed</th><th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>"


def confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """A confusion matrix as a heat-coloured table (rows: truth, columns: prediction)."""
    peak = max([max(r) for r in matrix if r] + [1])
    head = "".join(f"<th title='{html.escape(n)}'>{html.escape(n[:10])}</th>" for n in labels)
    rows = []
    for name, row in zip(labels, matrix):
        cells = "".join(f"<td style='background:rgba(76,120,168,{0.08 + 0.92 * v / peak if v else 0:.2f})'>{v or ''}</td>" for v in row)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<div style='overflow:auto'><table class='cm'><thead><tr><th>truth \\ predicted</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def scatter(points_xy: Sequence[dict[str, Any]], x_label: str, y_label: str, vline: float | None = None, hline: float | None = None) -> str:
    """A small SVG scatter plot; each point ``{x, y, label, chosen}``; optional budget lines."""
    if not points_xy:
        return "<p class='note'>nothing to plot</p>"
    w, h, pad = 640, 320, 48
    xs = [p["x"] for p in points_xy] + ([vline] if vline is not None else [])
    ys = [p["y"] for p in points_xy] + ([hline] if hline is not None else [])
    x0, x1 = min([*xs, 0.0]), max(xs) or 1.0
    y0, y1 = min([*ys, 0.0]), max(ys) or 1.0
    x1, y1 = (x1 + 0.1 * (x1 - x0 or 1)), (y1 + 0.1 * (y1 - y0 or 1))

    def sx(v: float) -> float:
        return pad + (v - x0) / (x1 - x0 or 1) * (w - 2 * pad)

    def sy(v: float) -> float:
        return h - pad - (v - y0) / (y1 - y0 or 1) * (h - 2 * pad)

    parts = [f"<svg viewBox='0 0 {w} {h}' width='{w}' height='{h}' style='background:#fff'>"]
    parts.append(
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#999'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#999'/>"
    )
    parts.append(f"<text x='{w / 2}' y='{h - 10}' text-anchor='middle' font-size='12'>{html.escape(x_label)}</text>")
    parts.append(f"<text x='14' y='{h / 2}' text-anchor='middle' font-size='12' transform='rotate(-90 14 {h / 2})'>{html.escape(y_label)}</text>")
    for v, text in ((x0, f"{x0:g}"), (x1, f"{x1:.3g}")):
        parts.append(f"<text x='{sx(v):.1f}' y='{h - pad + 14}' text-anchor='middle' font-size='10'>{text}</text>")
    for v, text in ((y0, f"{y0:g}"), (y1, f"{y1:.3g}")):
        parts.append(f"<text x='{pad - 4}' y='{sy(v):.1f}' text-anchor='end' font-size='10'>{text}</text>")
    if vline is not None:
        parts.append(f"<line x1='{sx(vline):.1f}' y1='{pad}' x2='{sx(vline):.1f}' y2='{h - pad}' stroke='#d62728' stroke-dasharray='4,3'/>")
        parts.append(f"<text x='{sx(vline) + 4:.1f}' y='{pad + 10}' font-size='10' fill='#d62728'>budget</text>")
    if hline is not None:
        parts.append(f"<line x1='{pad}' y1='{sy(hline):.1f}' x2='{w - pad}' y2='{sy(hline):.1f}' stroke='#999' stroke-dasharray='2,3'/>")
    for p in points_xy:
        colour = "#2ca02c" if p.get("chosen") else "#4c78a8"
        radius = 7 if p.get("chosen") else 4
        parts.append(
            f"<circle cx='{sx(p['x']):.1f}' cy='{sy(p['y']):.1f}' r='{radius}' fill='{colour}' fill-opacity='0.8'><title>{html.escape(p['label'])}</title></circle>"
        )
        if p.get("chosen"):
            parts.append(
                f"<text x='{sx(p['x']) + 9:.1f}' y='{sy(p['y']) + 4:.1f}' font-size='11' fill='#2ca02c'>chosen: {html.escape(p['label'])}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def thumbnail(path: str | Path, side: int = THUMB_SIDE) -> dict[str, Any] | None:
    """A picture as a JPEG data URI at most ``side`` pixels long, with its original size (None if unreadable)."""
    import cv2

    from fcos_offline.data.preprocess import read_image

    try:
        image = read_image(path)
    except Exception:  # an unreadable picture is left out of the page, the page still renders
        return None
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) if scale < 1 else image
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(small), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        return None
    return {"src": "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode(), "width": w, "height": h}


def png_data_uri(path: Path) -> str:
    """A PNG file as an ``<img>`` data URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def browser_section(analysis: dict[str, Any], images_dir: Path, max_images: int) -> tuple[str, dict[str, Any]]:
    """The image browser: ground truth and detections of the worst ``max_images`` images (by AP50), filters."""
    chosen: list[dict[str, Any]] = []
    for im in analysis["images"]:
        if len(chosen) >= max_images:
            break
        pic = thumbnail(images_dir / im["file_name"])
        if pic is None:
            continue
        chosen.append({**pic, "file_name": im["file_name"], "ap": im["ap"], "gt": im["gt"], "dets": im["dets"]})
    names = sorted({b["name"] for im in chosen for b in (*im["gt"], *im["dets"])})
    data = {"images": chosen, "kinds": {k: c for k, (c, _) in KINDS.items()}}
    options = "".join(f"<option>{html.escape(n)}</option>" for n in names)
    kinds = "".join(f"<option value='{k}'>{html.escape(k)}: {html.escape(text)}</option>" for k, (_, text) in KINDS.items())
    legend = "".join(f"<span><i class='sw' style='background:{c}'></i>{html.escape(k)}: {html.escape(t)}</span>" for k, (c, t) in KINDS.items())
    body = (
        f"<div class='controls'><label>class <select id='f-class'><option value='all'>all</option>{options}</select></label>"
        f"<label>kind <select id='f-kind'><option value='all'>all</option>{kinds}</select></label><span id='shown'></span></div>"
        f"<p class='legend'>{legend}<span><i class='sw' style='background:#fff;border:1px dashed #999'></i>ground truth (detected)</span></p>"
        "<div class='grid'></div>"
    )
    total = len(analysis["images"])
    note = (
        f"{_of(analysis)}Ground truth (dashed) and detections scoring at least {analysis['score_thr']:g} on each picture; the worst "
        f"images first (per-image AP at IoU {analysis['iou_thr']:g}; an image without objects counts as AP 0 when something is "
        f"detected on it, else 1). {len(chosen)} of {total} images shown."
    )
    return section("Image browser", f"<div id='browser'>{body}</div>", note, "images"), data


def class_section(analysis: dict[str, Any]) -> str:
    """The per-class table."""
    columns = [
        ("class", lambda r: r["name"], _text),
        ("objects", lambda r: r["num_gt"], _text),
        ("AP %", lambda r: r["AP"], _pct),
        ("AP50 %", lambda r: r["AP50"], _pct),
        ("AP75 %", lambda r: r["AP75"], _pct),
        ("AR100 %", lambda r: r["AR100"], _pct),
        ("precision %", lambda r: r["precision"], _pct),
        ("recall %", lambda r: r["recall"], _pct),
        ("TP", lambda r: r["tp"], _text),
        ("FP", lambda r: r["fp"], _text),
        ("FN", lambda r: r["fn"], _text),
    ]
    note = _of(analysis) + (
        f"COCO AP (IoU .5:.95), AP50, AP75 and AR with at most 100 detections per image; precision, recall and the counts at "
        f"the operating point: score >= {analysis['score_thr']:g}, IoU >= {analysis['iou_thr']:g}. Click a header to sort."
    )
    if unlisted := analysis.get("results_of_unlisted_categories"):
        note += f" {unlisted} detections of categories the annotation file does not list are left out, as COCO's evaluation does."
    return section("Per class", table(columns, analysis["classes"]), note, "classes")


def errors_section(analysis: dict[str, Any]) -> str:
    """The TIDE-style breakdown: what fixing each error kind would add to the AP."""
    tide = analysis["tide"]
    delta = {k: None if v is None else 100.0 * v for k, v in tide["delta_ap"].items()}
    labels = {k: f"{k} — {KINDS[k][1]} ({tide['counts'].get(k, 0)})" for k in delta}
    iou = analysis["iou_thr"]
    name = f"AP{round(100 * iou)}" if round(100 * iou) == 100 * iou else f"AP at IoU {iou:g}"
    note = f"{_of(analysis)}ΔAP in points of {name} ({name} {_pct(tide['ap'])}%), with the count of each kind. " + analysis["method"]
    return section(f"What costs {name}: errors by kind (TIDE-style)", bars(delta, labels), note, "errors")


def confusion_section(analysis: dict[str, Any]) -> str:
    """The confusion matrix at the operating point."""
    cm = analysis["confusion"]
    note = _of(analysis) + (
        f"Rows: the true class (last row: detections on no object); columns: the predicted class (last column: objects nobody "
        f"detected). Score >= {analysis['score_thr']:g}, IoU >= {analysis['iou_thr']:g}."
    )
    return section("Confusion matrix", confusion(cm["labels"], cm["matrix"]), note, "confusion")


def _of(analysis: dict[str, Any]) -> str:
    """Which configuration's detections a section explains (``run`` analyses one of its rows)."""
    return f"Detections of {analysis['configuration']}. " if analysis.get("configuration") else ""


def results_table(rows: list[dict[str, Any]]) -> str:
    """``run``'s results table (the same figures as report.json), sortable."""
    columns = [
        ("model", lambda r: r["model"], _text),
        ("online mAP % (PyTorch)", lambda r: r["online_mAP"], _pct),
        ("offline mAP % (engine)", lambda r: r["offline_mAP"], _pct),
        ("Δ mAP (points)", lambda r: r["delta_mAP"], lambda v: "—" if v is None else points(v)),
        ("AP50 %", lambda r: r["AP50"], _pct),
        ("AP75 %", lambda r: r["AP75"], _pct),
        ("engine img/s", lambda r: r["engine_img_per_s"], _num(2)),
        ("± spread %", lambda r: r["engine_spread_pct"], _num(0)),
        ("end-to-end img/s", lambda r: r["e2e_img_per_s"], _num(2)),
        ("engine ms/batch p50", lambda r: r["engine_ms_per_batch_p50"], _num(1)),
        ("p90", lambda r: r["engine_ms_per_batch_p90"], _num(1)),
        ("p99", lambda r: r["engine_ms_per_batch_p99"], _num(1)),
    ]
    return table(columns, rows)


def write_run_html(root: Path, report: dict[str, Any], analysis: dict[str, Any] | None, images_dir: Path | None, max_images: int) -> Path:
    """``report.html`` of a ``run``: results, per class, PR curves, confusion matrix, error breakdown, image browser."""
    sections = [
        section(
            "Results",
            results_table(report["table"]),
            "engine img/s: images per second inside the engine call; end-to-end: files in to dumps out; ms/batch: the engine "
            "call per batch (docs/measurement.md). mAP in percent, differences in points.",
            "results",
        )
    ]
    data: dict[str, Any] = {}
    if analysis is not None:
        sections.append(class_section(analysis))
    pr = root / "pr_curves.png"
    if pr.is_file():
        sections.append(section("PR curves", f"<img alt='PR curves' src='{png_data_uri(pr)}' style='max-width:100%'>", "", "pr"))
    if analysis is not None:
        sections += [confusion_section(analysis), errors_section(analysis)]
        if images_dir is not None:
            browse, data["browser"] = browser_section(analysis, images_dir, max_images)
            sections.append(browse)
    subtitle = f"{report.get('checkpoint')} on {report.get('num_images')} images of {report.get('images')}, canvas {report.get('shape')}"
    if analysis is not None and analysis.get("configuration"):
        subtitle += f"; per class, confusion, errors and images: {analysis['configuration']}"
    path = root / "report.html"
    atomic_write_bytes(path, page("fcos-offline run", subtitle, sections, data).encode())
    return path


def write_compare_html(out: Path, document: dict[str, Any], pairs: list[dict[str, Any]], names: tuple[str, str]) -> Path:
    """``report.html`` of a ``compare``: the overall figures, then the differing images side by side.

    ``pairs``: per image ``{file_name, width, height, src, a: [...], b: [...]}`` with each detection's
    ``bbox`` (x, y, w, h in the image), ``name``, ``score`` and ``differs`` (no partner within tolerance).
    """
    o = document["overall"]
    rows = [
        ("images", o["images"]),
        ("detections A / B", f"{o['detections_a']} / {o['detections_b']}"),
        ("matched", f"{o['matched']} ({percent(o['match_rate'])}%)"),
        ("only in A / only in B", f"{o['only_a']} / {o['only_b']}"),
        ("score error max / p99", f"{o['score_err_max']:.2g} / {o['score_err_p99']:.2g}"),
        ("box error max / p99 (canvas px)", f"{o['box_err_px_max']:.3g} / {o['box_err_px_p99']:.3g}"),
        ("within tolerance", "yes" if document.get("within_tolerance") else "no"),
    ]
    if document.get("delta_mAP") is not None:
        rows.append(("Δ mAP (B − A, points)", points(document["delta_mAP"])))
    summary = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    tol = document.get("tolerance") or {}
    sections = [
        section("Outputs", f"<table>{summary}</table>", f"Tolerance: {json.dumps(tol)}. A: {names[0]}; B: {names[1]}.", "overall"),
        section(
            "Images, side by side",
            "<div id='pairs'></div>",
            "The images that differ most, A left and B right: detections with a partner on the other side in green, "
            "those without one (or beyond the score/box tolerance) in red.",
            "pairs",
        ),
    ]
    data = {"pairs": {"images": pairs, "names": {"a": "A " + names[0], "b": "B " + names[1]}}}
    path = out / "report.html"
    atomic_write_bytes(path, page("fcos-offline compare", f"A {names[0]} vs B {names[1]}", sections, data).encode())
    return path


def write_tune_html(out: Path, result: dict[str, Any]) -> Path:
    """``report.html`` of a ``tune``: every trial (sortable) and speed against accuracy drop with the budget and the choice."""
    budget = result.get("settings", {}).get("max_map_drop")
    chosen = (result.get("chosen") or {}).get("key")
    trials = [t for t in result.get("trials", []) if t.get("status", "ok") == "ok"]
    plotted = [
        {"x": t["speedup_vs_reference"], "y": t["map_drop"], "label": t["label"], "chosen": t["key"] == chosen}
        for t in trials
        if t.get("speedup_vs_reference") is not None and t.get("map_drop") is not None
    ]
    columns = [
        ("configuration", lambda r: r["label"], _text),
        ("ms/img", lambda r: r["ms_per_img"], _num(2)),
        ("speedup", lambda r: r["speedup_vs_reference"], _num(2)),
        ("mAP %", lambda r: r["bbox_mAP"], _pct),
        ("drop (points)", lambda r: r["map_drop"], lambda v: "—" if v is None else f"{v:+.2f}"),
        ("agrees", lambda r: (r.get("agreement") or {}).get("within_tolerance"), lambda v: "—" if v is None else ("yes" if v else "no")),
        ("within budget", lambda r: r["within_budget"], lambda v: "yes" if v else "no"),
        ("chosen", lambda r: r["key"] == chosen, lambda v: "✓" if v else ""),
    ]
    check = result.get("accuracy_check") or {}
    note = f"Budget: {budget} mAP points. Accuracy judged by {check.get('criterion', 'mAP drop')}" + (
        f" ({check['why']})." if check.get("why") else "."
    )
    sections = [
        section(
            "Speed against accuracy",
            scatter(plotted, "speedup vs the fp32 reference (x)", "mAP drop (points, lower is better)", hline=budget),
            note + " The dashed line is the budget; the chosen configuration is green.",
            "plot",
        ),
        section("Trials", table(columns, trials), "Every measured configuration; click a header to sort.", "trials"),
    ]
    path = out / "report.html"
    atomic_write_bytes(
        path, page("fcos-offline tune", f"{result.get('model', '')}: fastest configuration within {budget} mAP points", sections, {}).encode()
    )
    return path
