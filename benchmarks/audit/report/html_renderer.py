"""The HTML renderer: sections → one self-contained page (inline CSS, base64 PNGs, no scripts)."""
from __future__ import annotations

import base64
import html
import math
from typing import Any

from .analysis import format_value
from collafuse.benchmarks.audit.meta import AuditMeta

from .document import STATUS_LABELS, Artifact, Figure, Gallery, Para, Pre, Section, Table, VerdictBox
from .sections import TITLE, subtitle

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d232a;background:#fafbfc}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:1.6em;margin:.3em 0 .1em}h2{font-size:1.25em;border-bottom:2px solid #dde3ea;padding-bottom:4px;margin-top:2em}
.meta{color:#5b6670;font-size:.9em;margin:0 0 14px}
#verdict{border-radius:10px;padding:18px 24px;margin:10px 0 14px;color:#fff}
#verdict.pass{background:#1e7d3a}#verdict.fail{background:#b3261e}#verdict.unknown{background:#6b7580}
#verdict.inconclusive{background:#a35d00}
#verdict .status{font-size:2.6em;font-weight:800;letter-spacing:.06em;line-height:1.1}
#verdict .text{font-size:1.2em;margin-top:6px}#verdict .count{font-size:.95em;opacity:.9;margin-top:6px}
#recommendation{border:2px solid #1e7d3a;background:#eef8f0;border-radius:8px;padding:12px 18px;margin-bottom:10px}
#recommendation.none{border-color:#b3261e;background:#fbeeed}
#recommendation h3{margin:0 0 6px;font-size:1.05em}#recommendation dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:0}
#recommendation dt{font-weight:600;color:#3b454f}#recommendation dd{margin:0}
.scroll{overflow-x:auto;margin:8px 0 14px}
table{border-collapse:collapse;font-size:.82em;background:#fff}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.nm{color:#8a939b;font-style:italic}
td.pass{color:#1e7d3a;font-weight:600}td.fail{color:#b3261e;font-weight:600}td.warn{color:#9a6700}
p.warn{background:#fff4d6;border-left:4px solid #d4a017;padding:6px 10px}
figure{margin:10px 0 18px;display:inline-block;max-width:100%;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #e1e5e9;background:#fff}
.gallery{display:flex;flex-wrap:wrap;gap:14px 18px;align-items:flex-start;margin:8px 0 4px}
.gallery figure{margin:0}
.gallery figure.art{width:300px}.gallery figure.art img{width:100%;image-rendering:pixelated}
.gallery figure.art.wide{width:560px}
p.caption{font-size:.85em;color:#4a545e;margin-top:2px}
figcaption{font-size:.85em;color:#4a545e;max-width:900px;margin-top:4px}
pre{background:#f1f3f5;border:1px solid #dde3ea;padding:10px 12px;overflow-x:auto;font-size:.82em;white-space:pre}
nav{font-size:.85em;margin-bottom:6px}nav a{margin-right:12px;color:#2457a6}
"""


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        tds = []
        for c in row:
            attrs = f' class="{c.cls}"' if c.cls else ""
            if c.value is not None and not math.isnan(c.value):
                attrs += f' data-value="{_esc(repr(float(c.value)))}"'
            tds.append(f"<td{attrs}>{_esc(c.text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    tid = f' id="{_esc(t.id)}"' if t.id else ""
    cap = f"<caption>{_esc(t.caption)}</caption>" if t.caption else ""
    return f'<div class="scroll"><table{tid}>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_verdict(v: VerdictBox) -> str:
    label = STATUS_LABELS.get(v.status, "NO VERDICT")
    count = f"{len(v.passing)} of {v.total} cells pass the policy." if v.total else "No cells were measured."
    out = [f'<div id="verdict" class="{v.status}"><div class="status">{label}</div>'
           f'<div class="text">{_esc(v.text)}</div><div class="count">{_esc(count)}</div></div>']
    r = v.recommendation
    if r:
        items = [("setting", r.defense), ("cut ratio", format_value(r.cut_ratio)),
                 ("client GFLOPs", format_value(r.client_gflops)), ("cell", r.cell), ("why", r.why)]
        dl = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(val)}</dd>" for k, val in items)
        out.append(f'<div id="recommendation"><h3>Recommendation: {_esc(r.defense)} at cut ratio '
                   f'{_esc(format_value(r.cut_ratio))}</h3><dl>{dl}</dl></div>')
    else:
        out.append('<div id="recommendation" class="none"><h3>Recommendation: none</h3>'
                   '<p>No setting in the grid passes the policy; there is nothing to recommend.</p></div>')
    return "".join(out)


def _artifact(a: Artifact) -> str:
    cls = "art wide" if a.wide else "art"
    return (f'<figure class="{cls}"><img src="{_data_uri(a.png)}" alt="{_esc(a.caption)}">'
            f"<figcaption>{_esc(a.caption)}</figcaption></figure>")


def render_html(sections: list[Section], meta: AuditMeta) -> str:
    """The whole page: title, the subtitle from ``meta``, a navigation bar and every section."""
    parts = []
    for s in sections:
        body = []
        for b in s.blocks:
            if isinstance(b, VerdictBox):
                body.append(_html_verdict(b))
            elif isinstance(b, Para):
                body.append(f'<p class="{b.cls}">{_esc(b.text)}</p>' if b.cls else f"<p>{_esc(b.text)}</p>")
            elif isinstance(b, Table):
                body.append(_html_table(b))
            elif isinstance(b, Figure):
                body.append(f'<figure><img src="{_data_uri(b.png)}" alt="{_esc(b.caption)}">'
                            f"<figcaption>{_esc(b.caption)}</figcaption></figure>")
            elif isinstance(b, Artifact):
                body.append(_artifact(b))
            elif isinstance(b, Gallery):
                items = []
                for item in b.items:
                    if isinstance(item, Artifact):
                        items.append(_artifact(item))
                    else:
                        items.append(f'<figure><img src="{_data_uri(item.png)}" alt="{_esc(item.caption)}"></figure>')
                body.append(f'<div class="gallery">{"".join(items)}</div>')
                if b.caption:
                    body.append(f'<p class="caption">{_esc(b.caption)}</p>')
            elif isinstance(b, Pre):
                body.append(f"<pre>{_esc(b.text)}</pre>")
        parts.append(f'<section id="{_esc(s.id)}"><h2>{_esc(s.title)}</h2>{"".join(body)}</section>')
    nav = "".join(f'<a href="#{_esc(s.id)}">{_esc(s.title.split(". ", 1)[-1])}</a>' for s in sections[1:])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(TITLE)}</title><style>{CSS}</style></head><body><main>"
            f'<h1>{_esc(TITLE)}</h1><p class="meta">{_esc(subtitle(meta))}</p><nav>{nav}</nav>'
            f'{"".join(parts)}</main></body></html>\n')
