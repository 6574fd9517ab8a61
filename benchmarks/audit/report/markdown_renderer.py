"""The Markdown renderer: sections → ``report.md`` (figures linked from ``figures/``, reconstructions from ``artifacts/``)."""
from __future__ import annotations

from typing import Any

from .analysis import format_value
from collafuse.benchmarks.audit.meta import AuditMeta

from .document import STATUS_LABELS, Artifact, Figure, Gallery, Para, Pre, Section, Table, VerdictBox
from .sections import TITLE, subtitle


def _md(text: Any) -> str:
    return str("" if text is None else text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md(c) or " " for c in t.columns) + " |", "|" + "---|" * len(t.columns)]
    for row in t.rows:
        lines.append("| " + " | ".join(_md(c.text) for c in row) + " |")
    return "\n".join(lines)


def render_markdown(sections: list[Section], meta: AuditMeta) -> str:
    """The whole document: title, the subtitle from ``meta`` and every section."""
    out = [f"# {TITLE}", "", subtitle(meta), ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, VerdictBox):
                label = STATUS_LABELS.get(b.status, "NO VERDICT")
                out += [f"### Verdict: **{label}**", "", b.text, "",
                        f"{len(b.passing)} of {b.total} cells pass the policy." if b.total else "No cells were measured.", ""]
                r = b.recommendation
                if r:
                    out += [f"**Recommendation:** {r.defense} at cut ratio {format_value(r.cut_ratio)}", "",
                            f"- cell: `{r.cell}`", f"- client GFLOPs: {format_value(r.client_gflops)}",
                            f"- why: {r.why}", ""]
                else:
                    out += ["**Recommendation:** none: no setting in the grid passes the policy.", ""]
            elif isinstance(b, Para):
                out += [("> " if b.cls == "warn" else "") + b.text, ""]
            elif isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Figure):
                out += [f"![{_md(b.caption)}](figures/{b.name})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Artifact):
                out += [f"![{_md(b.caption)}]({b.relpath})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Gallery):
                for item in b.items:
                    if isinstance(item, Artifact):
                        out += [f"![{_md(item.caption)}]({item.relpath})", "", f"*{item.caption}*", ""]
                    else:
                        out += [f"![{_md(item.caption)}](figures/{item.name})", ""]
                if b.caption:
                    out += [f"*{b.caption}*", ""]
            elif isinstance(b, Pre):
                fence = "~~~~" if "```" in b.text else "```"
                out += [f"{fence}{b.lang}", b.text.rstrip("\n"), fence, ""]
    return "\n".join(out).rstrip("\n") + "\n"
