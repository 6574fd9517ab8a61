"""The audit report's figures (DESIGN.md §7), each a pure function of tidy frames → PNG bytes.

Every function takes the frames :mod:`.report` derives from ``results.json`` and returns
the PNG of one figure, or ``None`` when there is nothing to draw (the report then says
"not measured"). Figures are drawn on bare :class:`matplotlib.figure.Figure` objects
(Agg, no pyplot state, nothing to close) at a fixed dpi with seaborn, and saved without
a timestamp so the same audit gives the same bytes.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from collafuse.attacks.membership.metrics import finish_log_roc_axes  # noqa: E402

DPI = 100
MAX_ROC_PANELS = 6
MAX_ROC_CURVES = 5
KIND_MARKERS = {"payload": "o", "system": "s"}
KIND_DASHES = {"payload": (4, 2), "system": ""}
THREAT_COLORS = {"T1": "#4c72b0", "T2": "#dd8452", "T3": "#55a868", "T4": "#c44e52", "T5": "#8172b3"}
_STYLE = {"axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8}


def palette(defenses: Sequence[str]) -> dict[str, Any]:
    """One colour per defense label, the same in every figure of a report."""
    colors = sns.color_palette("colorblind", n_colors=max(len(defenses), 1))
    return {d: colors[i % len(colors)] for i, d in enumerate(defenses)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _finite(frame: pd.DataFrame, column: str = "value") -> pd.DataFrame:
    return frame[np.isfinite(frame[column].astype(float))]


def _defense_legend(fig: Figure, colors: dict[str, Any], defenses: Sequence[str], kinds: Sequence[str]) -> None:
    handles = [Line2D([], [], color=colors[d], lw=2, label=d) for d in defenses]
    if len(kinds) > 1:
        handles += [
            Line2D([], [], color="0.3", marker=KIND_MARKERS.get(k, "o"), ls="--" if KIND_DASHES.get(k) else "-",
                   label=f"{k} cells") for k in kinds
        ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=8)


def _curve_panel(ax, frame: pd.DataFrame, colors: dict[str, Any], title: str, ylabel: str) -> None:
    """Value vs cut ratio, hue = defense, style = kind; interval bands from ci_low/ci_high (or the seed spread)."""
    data = _finite(frame)
    if data.empty:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_title(title)
        return
    kinds = [k for k in KIND_MARKERS if k in set(data["kind"])] + sorted(set(data["kind"]) - set(KIND_MARKERS))
    sns.lineplot(
        data=data, x="cut_ratio", y="value", hue="defense", style="kind", style_order=kinds,
        markers={k: KIND_MARKERS.get(k, "o") for k in kinds}, dashes={k: KIND_DASHES.get(k, "") for k in kinds},
        palette=colors, errorbar=None, estimator="mean", ax=ax, legend=False, markersize=5, linewidth=1.4,
    )
    for (defense, _kind), group in data.groupby(["defense", "kind"], sort=False):
        lo = group.groupby("cut_ratio")["ci_low"].min()
        hi = group.groupby("cut_ratio")["ci_high"].max()
        if lo.isna().all() or hi.isna().all():
            if group["seed"].nunique() < 2:
                continue
            lo = group.groupby("cut_ratio")["value"].min()
            hi = group.groupby("cut_ratio")["value"].max()
        band = pd.DataFrame({"lo": lo, "hi": hi}).dropna()
        band = band[np.isfinite(band["lo"]) & np.isfinite(band["hi"])]
        if len(band) >= 2:
            ax.fill_between(band.index.to_numpy(float), band["lo"], band["hi"], color=colors[defense], alpha=0.15, lw=0)
        elif len(band) == 1:
            x = float(band.index[0])
            ax.errorbar([x], [(band["lo"].iloc[0] + band["hi"].iloc[0]) / 2],
                        yerr=[[(band["hi"].iloc[0] - band["lo"].iloc[0]) / 2]], color=colors[defense], capsize=3, lw=1)
    ax.set_title(title)
    ax.set_xlabel("cut ratio c = t_c / T")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.02, 1.02)


def leakage_vs_cut(t1_reid: pd.DataFrame, t1_psnr: pd.DataFrame, membership: pd.DataFrame,
                   defenses: Sequence[str]) -> bytes | None:
    """Three panels: T1 re-identification and PSNR (best attack per cell), and the worst membership AUC
    of system cells, each against the cut ratio, one colour per defense."""
    if all(_finite(f).empty for f in (t1_reid, t1_psnr, membership)):
        return None
    colors = palette(defenses)
    kinds = [k for k in KIND_MARKERS if any(k in set(f["kind"]) for f in (t1_reid, t1_psnr, membership) if not f.empty)]
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(13, 4.2), dpi=DPI)
        axes = fig.subplots(1, 3)
        _curve_panel(axes[0], t1_reid, colors, "T1 re-identification in the pool (best attack)", "reid_pool")
        _curve_panel(axes[1], t1_psnr, colors, "T1 reconstruction PSNR (best attack)", "PSNR (dB)")
        _curve_panel(axes[2], membership, colors, "Membership AUC, worst of T2–T5 (system cells)", "AUC")
        if not _finite(membership).empty:
            axes[2].axhline(0.5, ls=":", color="0.5", lw=1)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        _defense_legend(fig, colors, defenses, kinds)
        return _png(fig)


def heatmap(table: pd.DataFrame, title: str, metric: str) -> bytes | None:
    """Cut × defense heatmap of worst-case leakage (index: defense, columns: cut ratio), values annotated."""
    if table.empty or not np.isfinite(table.to_numpy(float)).any():
        return None
    data = table.astype(float).replace([np.inf, -np.inf], np.nan)
    width = min(max(3.6, 0.62 * data.shape[1] + 2.6), 13)
    height = max(2.2, 0.42 * data.shape[0] + 1.4)
    with sns.axes_style("white"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI)
        ax = fig.subplots()
        sns.heatmap(data, annot=True, fmt=".3f", cmap="rocket_r", vmin=0.0, vmax=1.0 if metric in ("auc", "reid_pool") else None,
                    annot_kws={"fontsize": 7}, cbar_kws={"label": metric}, linewidths=0.5, linecolor="white", ax=ax)
        ax.set_xticklabels([f"{float(c):g}" for c in data.columns], rotation=0)
        ax.set_xlabel("cut ratio")
        ax.set_ylabel("")
        ax.set_title(title)
        fig.tight_layout()
        return _png(fig)


def class_heatmap(table: pd.DataFrame) -> bytes | None:
    """Rows (cell · threat) × class membership AUC, values annotated (0.5 is chance)."""
    if table.empty or not np.isfinite(table.to_numpy(float)).any():
        return None
    data = table.astype(float)
    width = min(max(4.0, 0.5 * data.shape[1] + 3.2), 14)
    height = max(2.0, 0.38 * data.shape[0] + 1.3)
    with sns.axes_style("white"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI)
        ax = fig.subplots()
        sns.heatmap(data, annot=True, fmt=".2f", cmap="vlag", vmin=0.0, vmax=1.0, center=0.5,
                    annot_kws={"fontsize": 6}, cbar_kws={"label": "AUC"}, linewidths=0.5, linecolor="white", ax=ax)
        ax.set_xlabel("class")
        ax.set_ylabel("")
        ax.set_title("membership AUC per class (worst attack of each threat)")
        fig.tight_layout()
        return _png(fig)


def roc_panels(panels: list[dict]) -> bytes | None:
    """ROC curves on log–log axes, one panel per system cell (at most :data:`MAX_ROC_PANELS`).

    ``panels``: ``[{"title": str, "curves": [(label, fpr, tpr)], "ceilings": [(label, Ceiling)]}]`` (ceilings
    optional: the formal trade-off curves, drawn black). Zero rates cannot be drawn on a log axis; they are
    clipped to a floor below the smallest positive rate.
    """
    panels = [p for p in panels if p["curves"]][:MAX_ROC_PANELS]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.4 * ncols, 4.0 * nrows), dpi=DPI)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, panel in zip(axes, panels):
            positive = [v for _, f, t in panel["curves"] for v in (*f, *t) if v > 0]
            floor = min(1e-3, min(positive) / 2) if positive else 1e-3
            for label, fpr, tpr in panel["curves"][:MAX_ROC_CURVES]:
                ax.plot(np.maximum(np.asarray(fpr, float), floor), np.maximum(np.asarray(tpr, float), floor),
                        lw=1.3, label=label)
            for i, (label, ceiling) in enumerate(panel.get("ceilings", ())):
                grid = np.logspace(np.log10(floor), 0.0, 200)
                bound = ceiling.tpr_bound(grid)
                if bound.min() > 0.99:  # drawn along the top edge: say so, or it looks absent
                    label += ": ≥ 0.99 at every FPR shown (vacuous here)"
                ax.plot(grid, np.maximum(bound, floor), color="black", lw=1.0,
                        ls=("-.", ":", "--", (0, (5, 1)))[i % 4], label=label)
            finish_log_roc_axes(ax, floor, panel["title"], title_size=8)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        return _png(fig)


def frontier(frame: pd.DataFrame, recommended: str | None,
             xlabel: str = "client GFLOPs per generated sample") -> bytes | None:
    """Privacy–utility–compute frontier of system cells.

    ``frame``: one row per cell with ``gflops`` (x), ``worst_auc`` and ``worst_reid`` (y, one
    panel each), ``accuracy``/``fid`` (colour bar), ``passed`` (marker: ● pass, ✕ fail, ◆ not
    evaluated). The recommended cell is ringed.
    """
    data = frame[np.isfinite(frame["gflops"].astype(float))]
    panels = [(c, t) for c, t in (("worst_auc", "worst membership AUC (T1–T5)"), ("worst_reid", "worst T1 reid_pool"))
              if np.isfinite(data[c].astype(float)).any()]
    if data.empty or not panels:
        return None
    if np.isfinite(data["accuracy"].astype(float)).any():
        hue, hue_label, cmap = "accuracy", "accuracy of generated samples", "viridis"
    elif np.isfinite(data["fid"].astype(float)).any():
        hue, hue_label, cmap = "fid", "FID (lower is better)", "viridis_r"
    else:
        hue, hue_label, cmap = None, "", None
    outcomes = {"pass": "o", "fail": "X", "not evaluated": "D"}
    data = data.assign(outcome=[{True: "pass", False: "fail"}[bool(p)] if isinstance(p, (bool, np.bool_))
                                else "not evaluated" for p in data["passed"]])
    norm = None
    if hue is not None:
        values = data[hue].astype(float)
        values = values[np.isfinite(values)]
        lo, hi = float(values.min()), float(values.max())
        norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(5.4 * len(panels) + 1.4, 4.7), dpi=DPI, layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        mappable = None
        for ax, (column, title) in zip(axes, panels):
            sub = data[np.isfinite(data[column].astype(float))]
            for outcome, marker in outcomes.items():
                part = sub[sub["outcome"] == outcome]
                colour = part[hue].astype(float).to_numpy() if hue else np.full(len(part), np.nan)
                has = np.isfinite(colour)
                if has.any():
                    mappable = ax.scatter(part["gflops"][has], part[column][has], c=colour[has], cmap=cmap, norm=norm,
                                          marker=marker, s=90, edgecolors="0.2", linewidths=0.8, zorder=3)
                if (~has).any():
                    ax.scatter(part["gflops"][~has], part[column][~has], color="0.6", marker=marker, s=90,
                               edgecolors="0.2", linewidths=0.8, zorder=3)
            if recommended is not None and recommended in set(sub["cell"]):
                row = sub[sub["cell"] == recommended].iloc[0]
                ax.scatter([row["gflops"]], [row[column]], s=420, facecolors="none", edgecolors="#d62728", linewidths=2.2,
                           zorder=4)
                ax.annotate("recommended", (row["gflops"], row[column]), xytext=(-14, 16), textcoords="offset points",
                            ha="right", color="#d62728", fontsize=8, fontweight="bold")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            ax.set_title(title)
            ax.margins(x=0.12, y=0.15)
        handles = [Line2D([], [], ls="", marker=m, color="0.35", markersize=8, label=o)
                   for o, m in outcomes.items() if (data["outcome"] == o).any()]
        if recommended is not None and recommended in set(data["cell"]):
            handles.append(Line2D([], [], ls="", marker="o", markersize=13, markerfacecolor="none",
                                  markeredgecolor="#d62728", markeredgewidth=2, label="recommended"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
        if mappable is not None:
            fig.colorbar(mappable, ax=list(axes), fraction=0.04, pad=0.02).set_label(hue_label)
        return _png(fig)


def formal_vs_empirical(frame: pd.DataFrame) -> bytes | None:
    """Empirical ε lower bound against the formal ε upper bound, one point per (cell, threat).

    ``frame``: columns ``threat``, ``formal`` (float, ∞ allowed), ``empirical`` (float). Points with
    no formal bound are drawn at a column labelled ∞ on the right; below the diagonal is consistent.
    """
    data = frame[np.isfinite(frame["empirical"].astype(float)) & frame["formal"].notna()].copy()
    if data.empty:
        return None
    finite = data["formal"][np.isfinite(data["formal"])]
    top = max([1.0, *finite.tolist(), *data["empirical"].tolist()])
    inf_x = top * 10 ** 0.6
    data["x"] = data["formal"].where(np.isfinite(data["formal"]), inf_x).clip(lower=1e-3)
    data["y"] = data["empirical"].clip(lower=1e-3)
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(5.6, 4.4), dpi=DPI)
        ax = fig.subplots()
        low = min(data["x"].min(), data["y"].min(), 0.1) / 2
        ax.plot([low, top * 2], [low, top * 2], ls="--", color="grey", lw=0.9, label="empirical = formal")
        sns.scatterplot(data=data, x="x", y="y", hue="threat", palette={t: THREAT_COLORS.get(t, "0.3") for t in data["threat"]},
                        s=70, ax=ax, edgecolor="0.2")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if (~np.isfinite(data["formal"])).any():
            ax.axvline(top * 3, color="0.6", lw=0.8)
            ticks = [t for t in ax.get_xticks() if low <= t <= top * 2]
            ax.set_xticks([*ticks, inf_x])
            ax.set_xticklabels([f"{t:g}" for t in ticks] + ["∞ (no bound)"])
        ax.set_xlim(low, inf_x * 2.5 if (~np.isfinite(data["formal"])).any() else top * 2)
        ax.set_ylim(low, top * 2)
        ax.set_xlabel("formal ε (upper bound)")
        ax.set_ylabel("largest empirical ε lower bound")
        ax.set_title("Formal vs empirical ε (below the diagonal = consistent)")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        return _png(fig)


def _cell_label(row: pd.Series) -> str:
    return f"{row['defense']}, c = {float(row['cut_ratio']):g}"


def auc_per_step(frame: pd.DataFrame, defenses: Sequence[str]) -> bytes | None:
    """Membership AUC against the query step, one panel per threat, one line per cell (colour = defense).

    ``frame``: the ``auc_at_t`` rows of one (target, attack) per (cell, threat) (the report picks the one with
    the worst final AUC), columns cell, defense, cut_ratio, threat, target, attack, t, value. The server (T2)
    is queried at t in (t_c, T], a client (T3) at t <= t_c, so each cell's line covers its own range."""
    data = _finite(frame)
    data = data[np.isfinite(data["t"].astype(float))]
    if data.empty:
        return None
    threats = [t for t in THREAT_COLORS if t in set(data["threat"])]
    colors = palette(defenses)
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.6 * len(threats) + 0.4, 4.0), dpi=DPI)
        axes = np.atleast_1d(fig.subplots(1, len(threats)))
        for ax, threat in zip(axes, threats):
            for (_cell, _target, _attack), line in data[data["threat"] == threat].groupby(["cell", "target", "attack"],
                                                                                          sort=False):
                line = line.sort_values("t")
                first_row = line.iloc[0]
                ax.plot(line["t"].astype(float), line["value"], marker="o", markersize=3,
                        lw=1.3, color=colors.get(first_row["defense"], "0.3"), alpha=0.85)
            ax.axhline(0.5, ls=":", color="0.5", lw=1)
            ax.set_title(f"{threat}: AUC per query step (worst attack of each cell)")
            ax.set_xlabel("query step t (diffusion step)")
            ax.set_ylabel("AUC")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        _defense_legend(fig, colors, [d for d in defenses if d in set(data["defense"])], [])
        return _png(fig)


def leakage_vs_epochs(frame: pd.DataFrame) -> bytes | None:
    """T2/T3 membership AUC and TPR at 1 % FPR against the training epoch (TF Privacy's "vulnerability per
    epoch"): two panels, one line per (cell, threat), colour = threat.

    ``frame``: columns cell, defense, cut_ratio, threat, epoch, metric ("auc" / "tpr_at_1pct_fpr"), value: the
    worst over targets and attacks per (cell, threat, epoch, metric), the snapshots and the final models."""
    data = _finite(frame)
    data = data[np.isfinite(data["epoch"].astype(float))]
    if data.empty:
        return None
    styles = ["-", "--", "-.", ":"]
    cells = list(dict.fromkeys(data["cell"]))
    with sns.axes_style("whitegrid"), matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(10.4, 4.2), dpi=DPI)
        axes = fig.subplots(1, 2)
        handles = []
        for ax, (metric, title) in zip(axes, (("auc", "membership AUC"), ("tpr_at_1pct_fpr", "TPR at 1 % FPR"))):
            for (cell, threat), line in data[data["metric"] == metric].groupby(["cell", "threat"], sort=False):
                line = line.sort_values("epoch")
                style = styles[cells.index(cell) % len(styles)]
                ax.plot(line["epoch"].astype(float), line["value"], ls=style, marker="o", markersize=4, lw=1.4,
                        color=THREAT_COLORS.get(threat, "0.3"))
                label = f"{threat} · {_cell_label(line.iloc[0])}"
                if metric == "auc" and label not in [h.get_label() for h in handles]:
                    handles.append(Line2D([], [], ls=style, marker="o", color=THREAT_COLORS.get(threat, "0.3"),
                                          label=label))
            if metric == "auc":
                ax.axhline(0.5, ls=":", color="0.5", lw=1)
            ax.set_xscale("log")
            epochs = sorted(set(data["epoch"].astype(float)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(epochs, [f"{e:g}" for e in epochs])
            ax.set_title(f"{title} against training length (worst attack)")
            ax.set_xlabel("training epoch (log scale)")
            ax.set_ylabel(title)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False, fontsize=8)
        return _png(fig)
