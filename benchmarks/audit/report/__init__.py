"""The audit report (DESIGN.md §7; issue 6 item 5): one self-contained HTML page plus Markdown.

:func:`write_report` reads an audit folder (``results.json``: the tidy rows;
``audit.json``: cells, policy evaluations, verdict, coverage, configuration) and writes
``report.html`` (every image a base64 PNG data URI, inline CSS, no scripts, no external
references: it opens offline) and ``report.md`` (figures under ``figures/``, linked
relatively; reconstructions linked from ``artifacts/``). Both come from one list of
sections, so they say the same thing:

1. the verdict and the recommendation (``#verdict``, ``#recommendation``)
   1a. samples of every trained system beside the baselines', and the server's hand-off check (``#handoff-table``)
2. leakage vs cut ratio per defense
3. cut × defense heatmaps of worst-case leakage, and the per-cell table ``#leakage-table``
4. membership ROC curves (log–log) from the cells' ``roc.json``
   4a. TPR at 0.1 % FPR (resolved?), balanced accuracy, ε_GDP per cell × threat; AUC per query step
   4b. T2/T3 AUC and TPR at 1 % FPR against training epochs (``training.snapshots``)
   4e. T5, the curious co-client: extraction of other clients' images and membership (``#coclient-table``)
5. the privacy–utility–compute frontier
6. formal vs empirical ε
7. example reconstructions beside the originals
8. the threat × defense coverage map
9. the per-cell policy checks
10. the exact configuration

Conventions the tests rely on:

- *Worst-case leakage* of a (cell, threat) is the largest measured value, over every
  attack and target, of the threat's headline metric: ``reid_pool`` for T1 (``auc`` when a
  cell has no re-identification rows), ``auc`` for T2–T5 (:data:`HEADLINE`). Ties go to the
  first row in ``results.json``.
- Every number is printed with :func:`format_value` (3 decimals, scientific outside
  [1e-3, 1e6)); table cells that hold a number also carry it unrounded in ``data-value``.
- Nothing measured prints as "not measured"; a formal ε that is null or infinite prints "∞".
- Table ids: ``leakage-table`` (one row per cell × threat), ``frontier-table``,
  ``epsilon-table``, ``coverage-table``, ``handoff-table``, ``cells-table`` and ``checks-table`` (policy),
  ``run-table``, ``versions-table``, ``cells-config-table``, ``membership-detail-table``,
  ``epochs-table``, ``coclient-table``.

Modules: :mod:`.analysis` (the tables: worst-case leakage, frontier, formal ε, coverage,
:func:`format_value`), :mod:`.document` (the blocks a section holds), :mod:`.sections` (the
content, :func:`build_sections`), :mod:`.html_renderer` and :mod:`.markdown_renderer`. The
rows are read by :func:`collafuse.benchmarks.audit.results.read_results`, the table's own reader.

Writing is atomic: everything is rendered in memory first and the files are renamed into
place at the end; on any error the previous report is left as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from collafuse.errors import RunError

from collafuse.benchmarks.audit.meta import AUDIT_JSON, AuditMeta
from collafuse.benchmarks.audit.results import read_audit_file, read_results

from .analysis import (FORMAL_FOR_THREAT, HEADLINE, NOT_MEASURED, best_per_cell, coverage_matrix, format_value,
                       formal_table, frontier_table, worst_leakage)
from .document import (Artifact, Figure, Gallery, Para, Pre, Section, Table, TableCell, VerdictBox, num, txt,
                       verdict_cell)
from .html_renderer import render_html
from .markdown_renderer import render_markdown
from .sections import MAX_RECONSTRUCTIONS, build_sections

__all__ = [
    "AUDIT_JSON", "load_audit", "write_report", "build_sections", "render_html", "render_markdown",
    "format_value", "worst_leakage", "best_per_cell", "frontier_table", "formal_table", "coverage_matrix",
    "HEADLINE", "FORMAL_FOR_THREAT", "NOT_MEASURED", "MAX_RECONSTRUCTIONS",
    "TableCell", "Table", "Para", "Figure", "Artifact", "Gallery", "Pre", "VerdictBox", "Section", "num", "txt",
    "verdict_cell",
]


def load_audit(audit_dir: Path) -> tuple[pd.DataFrame, AuditMeta]:
    """The tidy rows (:func:`~collafuse.benchmarks.audit.results.read_results`) and the metadata
    (``audit.json``, validated once into :class:`~..meta.AuditMeta`) of an audit folder; :class:`RunError`
    (one line) if it is not one."""
    audit_dir = Path(audit_dir)
    frame = read_results(audit_dir)
    raw = read_audit_file(audit_dir, AUDIT_JSON)
    if not isinstance(raw, dict):
        raise RunError(f"{audit_dir / AUDIT_JSON} is corrupt: expected a JSON object")
    return frame, AuditMeta.from_json(raw)


def write_report(audit_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and ``figures/``) into ``audit_dir``; return their paths.

    Raises :class:`RunError` if ``audit_dir`` is not an audit (missing or corrupt
    ``results.json``/``audit.json``). Nothing is replaced until everything is rendered.
    """
    audit_dir = Path(audit_dir)
    rows, meta = load_audit(audit_dir)
    sections = build_sections(audit_dir, rows, meta)
    html_text = render_html(sections, meta)
    md_text = render_markdown(sections, meta)
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    figures += [i for s in sections for b in s.blocks if isinstance(b, Gallery) for i in b.items if isinstance(i, Figure)]

    tag = f"{os.getpid()}"
    html_path, md_path, fig_dir = audit_dir / "report.html", audit_dir / "report.md", audit_dir / "figures"
    tmp_html = audit_dir / f".report.html.partial-{tag}"
    tmp_md = audit_dir / f".report.md.partial-{tag}"
    tmp_figs = audit_dir / f".figures.partial-{tag}"
    old_figs = audit_dir / f".figures.old-{tag}"
    try:
        shutil.rmtree(tmp_figs, ignore_errors=True)
        tmp_figs.mkdir()
        for f in figures:
            (tmp_figs / f.name).write_bytes(f.png)
        tmp_html.write_text(html_text, encoding="utf-8")
        tmp_md.write_text(md_text, encoding="utf-8")
        moved = fig_dir.exists()
        if moved:
            fig_dir.rename(old_figs)
        try:
            tmp_figs.rename(fig_dir)
        except OSError:
            if moved:
                old_figs.rename(fig_dir)
            raise
        os.replace(tmp_md, md_path)
        os.replace(tmp_html, html_path)
    finally:
        tmp_html.unlink(missing_ok=True)
        tmp_md.unlink(missing_ok=True)
        shutil.rmtree(tmp_figs, ignore_errors=True)
        shutil.rmtree(old_figs, ignore_errors=True)
    return html_path, md_path
