"""report/index.html: the run report as one self-contained page, readable offline.

Built from what the run left in report/ and the metrics it holds: the metrics table, the training
curve, the reliability diagram, the region map (a geospatial calibrator), the privacy report
(privacy.json), the fairness report (fairness.json, fairness.png), attribution summaries
(attribution.json, attribution.png), and the report.md sections the post-fit steps add. A section
appears only when its source exists. Images are embedded as base64 data URIs, the CSS is inline,
there is no script, and a Content-Security-Policy forbids fetching anything: the page shows the
same on a laptop with no network as on the machine that trained. Each section has a stable id
(`metrics`, `curves`, `reliability`, `region-map`, `privacy`, `fairness`, `attribution`,
`section-<slug>`) for links and tests.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INDEX_FILE = "index.html"
# (id, title, png, caption): the plots a run may write into report/, in page order
PLOTS = (
    ("curves", "Training curves", "training_curve.png", "Training loss and validation log loss / AUC per epoch."),
    ("reliability", "Reliability", "reliability.png",
     ("Mean predicted CTR against observed CTR (and the true CTR on the simulator) over equal-mass bins of the "
     "test split; the grey diagonal is perfect calibration.")),
    ("region-map", "Region map", "region_map.png",
     ("The geospatial calibrator's odds factor per region at its centroid (size: impressions; black edge: "
     "smoothed from neighbours).")),
)
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5ccd6;font-size:13px}
nav{padding:8px 32px;background:#e8ebf0;font-size:13px}nav a{margin-right:14px;color:#1d4f91;text-decoration:none}
main{padding:8px 32px 40px;max-width:1100px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 12px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,monospace}
th{background:#f0f2f5}
img{max-width:100%;height:auto;border:1px solid #eceff3}
figcaption{font-size:12px;color:#5a6472;margin-top:4px}
code{font-family:ui-monospace,monospace;font-size:12px}
.split{font-weight:600;color:#1d4f91}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def image_tag(path: Path, element_id: str, alt: str) -> str:
    """<img> with the PNG inlined as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img id="{_e(element_id)}-img" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        v = float(v)
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.5f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return str(v)


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """The metrics, one row each, grouped by split (the part before the first '/')."""
    rows, last = [], None
    for key in sorted(metrics):
        value = metrics[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        split = key.split("/", 1)[0] if "/" in key else ""
        if split != last:
            rows.append(f'<tr><td class="split" colspan="2">{_e(split or "other")}</td></tr>')
            last = split
        rows.append(f'<tr><td><code>{_e(key)}</code></td><td class="num">{_e(format_value(value))}</td></tr>')
    return '<table id="metrics-table"><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>' + \
        "".join(rows) + "</tbody></table>"


def kv_table(data: Mapping[str, Any], element_id: str) -> str:
    """A flat key/value table; nested values are shown as compact JSON."""
    rows = []
    for key, value in data.items():
        shown = json.dumps(value, default=str) if isinstance(value, (dict, list)) else format_value(value)
        if len(shown) > 300:
            shown = shown[:297] + "..."
        rows.append(f'<tr><td><code>{_e(key)}</code></td><td class="num">{_e(shown)}</td></tr>')
    return f'<table id="{_e(element_id)}"><tbody>' + "".join(rows) + "</tbody></table>"


def _section(element_id: str, title: str, body: str) -> str:
    return f'<section id="{_e(element_id)}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(report_dir: Path, element_id: str, png: str, caption: str) -> str:
    return (f"<figure>{image_tag(report_dir / png, element_id, caption)}"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def privacy_section(report_dir: Path) -> str | None:
    data = _read_json(report_dir / "privacy.json")
    if not isinstance(data, Mapping):
        return None
    first = ("status", "epsilon", "delta", "noise_multiplier", "accountant", "max_grad_norm", "sample_rate", "steps")
    ordered = {k: data[k] for k in first if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return _section("privacy", "Privacy", "<p>Differential-privacy guarantee of the training run "
                    "(report/privacy.json).</p>" + kv_table(ordered, "privacy-table"))


def fairness_section(report_dir: Path) -> str | None:
    data = _read_json(report_dir / "fairness.json")
    if not isinstance(data, Mapping):
        return None
    parts = [(f"<p>Calibration and ranking by demographic group on the {_e(data.get('split', 'test'))} split, "
             f"fields: {_e(', '.join(map(str, data.get('fields', []))))} (report/fairness.json).</p>")]
    worst = data.get("worst_group_ece") or {}
    rows = []
    for when in ("before", "after"):
        w = worst.get(when) or {}
        if w:
            rows.append(f"<tr><td>{_e(when)}</td><td>{_e(w.get('field', '-'))}</td><td>{_e(w.get('group', '-'))}</td>"
                        f'<td class="num">{_e(format_value(w.get("ece")))}</td></tr>')
    if rows:
        parts.append('<table id="fairness-worst"><thead><tr><th>per-group calibration</th><th>field</th>'
                     "<th>worst group</th><th>ECE</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    effect = data.get("effect")
    if isinstance(effect, Mapping) and effect:
        parts.append(effect_table(effect))
    if (report_dir / "fairness.png").is_file():
        parts.append(_figure(report_dir, "fairness", "fairness.png", "Metrics per group, before and after "
                             "per-group calibration."))
    return _section("fairness", "Fairness", "".join(parts))


def effect_table(effect: Mapping[str, Any]) -> str:
    """fairness.json's `effect` ({field: {group: {metric_before, metric_after, ...}}}) as one table."""
    keys: list[str] = []
    for groups in effect.values():
        for values in (groups or {}).values():
            keys += [k for k in (values or {}) if k not in keys]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = []
    for field, groups in effect.items():
        for group, values in (groups or {}).items():
            cells = "".join(f'<td class="num">{_e(format_value((values or {}).get(k)))}</td>' for k in keys)
            rows.append(f"<tr><td>{_e(field)}</td><td>{_e(group)}</td>{cells}</tr>")
    return (f'<table id="fairness-effect"><thead><tr><th>field</th><th>group</th>{head}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def attribution_section(report_dir: Path) -> str | None:
    """attribution.json (the post-fit step `attribution`): per-modality and per-field mean |attribution|."""
    data = _read_json(report_dir / "attribution.json")
    has_png = (report_dir / "attribution.png").is_file()
    if not isinstance(data, Mapping) and not has_png:
        return None
    parts = []
    if isinstance(data, Mapping):
        parts.append(f"<p>Mean |attribution| on the logit scale over {_e(data.get('n_rows', '?'))} "
                     f"{_e(data.get('split', ''))} rows against {_e(data.get('reference_rows', '?'))} reference "
                     f"training rows, method {_e(data.get('method', '?'))} (report/attribution.json).</p>")
        for key, element_id in (("modalities", "attribution-modalities"), ("fields", "attribution-table")):
            values = data.get(key)
            if isinstance(values, Mapping):
                pairs = sorted(((k, v) for k, v in values.items() if isinstance(v, (int, float))),
                               key=lambda kv: -abs(float(kv[1])))
                parts.append(kv_table(dict(pairs), element_id))
    if has_png:
        parts.append(_figure(report_dir, "attribution", "attribution.png", "Global attribution per field."))
    return _section("attribution", "Attributions", "".join(parts))


def render_markdown(text: str) -> str:
    """A report.md section body (tables, lists) as HTML; raw HTML in it is escaped, not passed through."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(str(text))


def render_html(report_dir: Path, metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                title: str = "Run report") -> str:
    """The page's HTML (see the module docstring)."""
    report_dir = Path(report_dir)
    sections = [_section("metrics", "Metrics", metrics_table(metrics))]
    for element_id, heading, png, caption in PLOTS:
        if (report_dir / png).is_file():
            sections.append(_section(element_id, heading, _figure(report_dir, element_id, png, caption)))
    for build in (privacy_section, fairness_section, attribution_section):
        block = build(report_dir)
        if block is not None:
            sections.append(block)
    for heading, body in (extra or {}).items():
        sections.append(_section(f"section-{slug(heading)}", heading, render_markdown(body)))
    nav = "".join(f'<a href="#{m.group(1)}">{_e(m.group(2))}</a>'
                  for m in re.finditer(r'<section id="([^"]+)"><h2>([^<]+)</h2>', "".join(sections)))
    run = report_dir.resolve().parent.name
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)} - {_e(run)}</title>"
        f"<style>{CSS}</style></head><body>"
        f'<header id="title"><h1>{_e(title)}</h1><p>{_e(report_dir.resolve().parent)}</p></header>'
        f'<nav id="toc">{nav}</nav><main>{"".join(sections)}</main></body></html>\n'
    )


def write_html_report(report_dir: Path, metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                      title: str = "Run report") -> Path:
    """report_dir/index.html from the metrics, report.md's extra sections and the files in report_dir."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / INDEX_FILE
    path.write_text(render_html(report_dir, metrics, extra, title), encoding="utf-8")
    return path


__all__ = ["INDEX_FILE", "render_html", "write_html_report"]
