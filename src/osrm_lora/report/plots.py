"""Report figures: one pure function per plot, ``results -> PNG bytes`` (or ``None`` when the run has
nothing to plot). Matplotlib's Agg canvas is used directly (no pyplot global state, no display).

Colours are fixed per init across all figures, so one init reads the same everywhere.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from osrm_lora.report.tables import (
    SELECTION_RULE,
    fmt,
    init_label,
    init_names,
    interference_scale,
    is_number,
    is_osrm,
    memory_mb,
    merged_records,
    methods,
    ratio_matrices,
    scale_text,
    seed_text,
    single_avg,
)

DPI = 100
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]


def init_colors(results: Mapping[str, Any]) -> dict[str, str]:
    """A fixed colour per init (config order)."""
    return {n: PALETTE[k % len(PALETTE)] for k, n in enumerate(init_names(results))}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()


def _nan(v: Any) -> float:
    return float(v) if is_number(v) else float("nan")


def _bar_labels(ax: Any, bars: Any, spec: str = ".1f", fontsize: float = 7) -> None:
    """Each bar's value just above it."""
    for b in bars:
        h = b.get_height()
        if math.isfinite(h):
            ax.annotate(f"{h:{spec}}", (b.get_x() + b.get_width() / 2, h), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=fontsize)


MARKER_S = 260.0  # area (points²) of the single-task marker "_" in the absolute panel: about 16 pt long
MARKER_LW = 2.0  # its thickness in points
LABEL_GAP_PT = 3.0  # gap between a value label and the bar top or marker below it


def absolute_axis_range(values: Sequence[float], headroom: float = 0.2) -> tuple[float, float]:
    """y range of the absolute panel, zoomed to the data: from a round number below the smallest merged
    score or single-task average (0 when that comes close to 0) to above the largest, with ``headroom``
    (a fraction of the axis height) left free above the data for the value labels."""
    vals = [float(v) for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 100.0
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 1.0)
    step = 10.0 if span > 30 else 5.0 if span > 8 else 2.0 if span > 3 else 1.0
    lower = math.floor((lo - max(0.35 * span, 0.5)) / step) * step
    if lower <= 0 or lower < 0.15 * hi:
        lower = 0.0
    upper = hi + (hi - lower) * headroom / (1 - headroom)
    return lower, upper


def _axis_break(ax: Any) -> None:
    """Two short diagonal strokes across the bottom of the y axis: the axis does not start at 0."""
    for y in (0.018, 0.048):
        ax.plot([0], [y], transform=ax.transAxes, marker=[(-1, -0.5), (1, 0.5)], markersize=9, linestyle="none",
                color="black", mec="black", mew=1.2, clip_on=False, zorder=5, gid="axis-break")


def _place_value_labels(fig: Figure, ax: Any, points: Sequence[tuple[float, float, float]], bar_width: float,
                        fontsize: float) -> None:
    """Label each bar (x, bar top, single-task average) with its value, just above the bar; where that
    label would touch the single-task marker, above the marker instead. A label wider than its bar is
    turned upright. Positions are measured with the renderer, after the layout is fixed."""
    # _new_figure attaches an Agg canvas; matplotlib's backend_agg module carries no annotations
    renderer = cast(FigureCanvasAgg, fig.canvas).get_renderer()  # type: ignore[no-untyped-call]
    px_per_pt = fig.dpi / 72
    half_marker = (MARKER_LW / 2 + 1.0) * px_per_pt  # the marker's half thickness, plus a pixel of air
    for x, v, ref in points:
        if not math.isfinite(v):
            continue
        label = ax.annotate(f"{v:.1f}", (x, v), xytext=(0, LABEL_GAP_PT), textcoords="offset points", ha="center",
                            va="bottom", fontsize=fontsize, zorder=4, gid="value-label")
        x0, _ = ax.transData.transform((x - bar_width / 2, v))
        x1, _ = ax.transData.transform((x + bar_width / 2, v))
        if label.get_window_extent(renderer).width > 0.92 * (x1 - x0):
            label.set_rotation(90)
        if not math.isfinite(ref):
            continue
        box = label.get_window_extent(renderer)
        _, ref_px = ax.transData.transform((x, ref))
        if box.y0 - half_marker < ref_px < box.y1 + half_marker:  # the label would sit on the marker
            label.xy = (x, ref)
            label.xyann = (0, LABEL_GAP_PT + MARKER_LW / 2)


def normalised_bars_figure(results: Mapping[str, Any]) -> Figure | None:
    """The figure of :func:`normalised_bars_png` before rendering (None without merged results), so its
    layout can be inspected: the absolute panel has gid ``absolute``, its value labels gid ``value-label``
    and the single-task markers gid ``single-task-marker``."""
    meths = methods(results)
    inits = init_names(results)
    if not meths:
        return None
    colors = init_colors(results)
    by = {(r["init"], r["method"]): r for r in results["merged"]}
    width = 0.8 / max(len(inits), 1)
    n_bars = len(meths) * len(inits)
    stacked = n_bars > 8  # many bars: the two panels one above the other, full width each
    if stacked:
        fig = _new_figure(min(12.0, 3.0 + 0.42 * n_bars), 7.6)
        ax_n, ax_a = fig.subplots(2, 1)
    else:
        fig = _new_figure(max(8.0, 2.2 + 0.8 * n_bars * 2 / max(len(inits), 1)), 4.2)
        ax_n, ax_a = fig.subplots(1, 2)
    ax_a.set_gid("absolute")
    fontsize = 6.5 if n_bars > 12 else 7.0
    xs = range(len(meths))
    top_n = 100.0
    abs_points: list[tuple[float, float, float]] = []  # (x, bar top, single-task avg) per bar
    for k, init in enumerate(inits):
        off = (k - (len(inits) - 1) / 2) * width
        norm = [_nan(by.get((init, m), {}).get("avg_normalised_test")) for m in meths]
        absv = [_nan(by.get((init, m), {}).get("avg_test")) for m in meths]
        top_n = max([top_n] + [v for v in norm if math.isfinite(v)])
        bars = ax_n.bar([x + off for x in xs], norm, width, color=colors[init], label=init_label(results, init))
        _bar_labels(ax_n, bars, fontsize=fontsize)
        ax_a.bar([x + off for x in xs], absv, width, color=colors[init], label=init_label(results, init))
        ref = single_avg(results, init)
        abs_points += [(x + off, v, ref) for x, v in zip(xs, absv)]
        ax_a.scatter([x + off for x in xs], [ref] * len(meths), marker="_", s=MARKER_S, color="black",
                     linewidths=MARKER_LW, zorder=3, label="single-task avg (same init)" if k == 0 else None,
                     gid="single-task-marker")
    data = [v for _, v, _ in abs_points] + [r for _, _, r in abs_points]
    lower, upper = absolute_axis_range(data)
    ax_a.set_ylim(lower, upper)
    ax_a.set_ylabel("avg merged test score (0..100 scale)")
    if lower > 0:
        _axis_break(ax_a)
        ax_a.set_xlabel(f"y axis zoomed to the data: it starts at {lower:g}, not 0", fontsize=8, color="#8a4b00")
    ax_n.axhline(100, color="grey", lw=0.8, ls="--")
    ax_n.set_ylim(0, top_n * 1.12)
    ax_n.set_ylabel("avg normalised test score (%)")
    ax_n.set_title("Normalised: merged / single-task (test)", fontsize=10)
    ax_a.set_title("Absolute: merged average (test), — = single-task avg", fontsize=10)
    for ax in (ax_n, ax_a):
        ax.set_xticks(list(xs), labels=meths, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = ax_a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Merged scores per method and init (test split; {SELECTION_RULE}; {seed_text(results)})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if not stacked else 0.045, 1, 1))
    # room above the highest bar or marker for a label (upright when the bars are narrow), now that the
    # panel's height is known
    panel_pt = ax_a.get_window_extent().height * 72 / fig.dpi
    label_pt = LABEL_GAP_PT + MARKER_LW + fontsize * (3.2 if width * ax_a.get_window_extent().width
                                                      / (len(meths) * fig.dpi / 72) < 3 * fontsize else 1.4)
    lower, upper = absolute_axis_range(data, headroom=min(0.45, (label_pt + 3) / max(panel_pt, 1.0)))
    ax_a.set_ylim(lower, upper)
    _place_value_labels(fig, ax_a, abs_points, width, fontsize)
    return fig


def normalised_bars_png(results: Mapping[str, Any]) -> bytes | None:
    """Grouped bars per method, one bar per init: average normalised test % (left) and, beside it, the
    absolute average merged test score with the single-task average of the same init marked (right; the
    y axis zoomed to the data, the break marked, each value label above its bar and marker)."""
    fig = normalised_bars_figure(results)
    return None if fig is None else figure_png(fig)


def lambda_curves_png(results: Mapping[str, Any]) -> bytes | None:
    """One row per method, three panels (avg validation, avg test, avg normalised test) over lambda, one
    line per init; the lambda selected on validation is marked with a large diamond."""
    recs = [r for r in merged_records(results) if len(r.get("curve", [])) > 0]
    meths = [m for m in methods(results) if any(r["method"] == m for r in recs)]
    if not meths:
        return None
    colors = init_colors(results)
    cols = [("avg_validation", "avg validation score"), ("avg_test", "avg test score"),
            ("avg_normalised_test", "avg normalised test (%)")]
    fig = _new_figure(12.0, 0.9 + 2.9 * len(meths))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(meths), 3, squeeze=False)
    for row, meth in enumerate(meths):
        for col, (key, label) in enumerate(cols):
            ax = axes[row][col]
            for rec in [r for r in recs if r["method"] == meth]:
                pts = sorted((float(p["lambda"]), _nan(p.get(key))) for p in rec["curve"] if is_number(p.get("lambda")))
                if not pts:
                    continue
                lam_x, ys = zip(*pts)
                c = colors.get(rec["init"], "black")
                ax.plot(lam_x, ys, marker="o", ms=3.5, lw=1.6, color=c, label=init_label(results, rec["init"]))
                sel = rec.get("lambda")
                if is_number(sel):
                    ysel = [y for x, y in pts if math.isclose(x, float(sel))]
                    if ysel:
                        ax.plot([float(sel)], ysel[:1], marker="D", ms=9, color=c, markeredgecolor="black",
                                linestyle="none", zorder=4)
            if key == "avg_normalised_test":
                ax.axhline(100, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{meth}: {label}", fontsize=9)
            ax.set_xlabel("λ (scaling coefficient)", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], marker="D", ms=8, color="white", markeredgecolor="black", linestyle="none"))
    labels.append("λ selected on validation")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Robustness over λ (test curves are reported, never used for selection)", fontsize=11)
    return figure_png(fig)


def interference_figure(results: Mapping[str, Any]) -> Figure | None:
    """The figure of :func:`interference_png` before rendering (None without ratio matrices); every
    heatmap of it uses the one colour scale of :func:`osrm_lora.report.tables.interference_scale`."""
    diags = ratio_matrices(results)
    scale = interference_scale(results)
    if not diags or scale is None:
        return None
    norm: Normalize = LogNorm(vmin=scale[0], vmax=scale[1]) if scale[2] else Normalize(vmin=scale[0], vmax=scale[1])
    T = max(len(d["tasks"]) for _, d in diags)
    cell = 0.62 if T <= 5 else 0.48
    ncols = min(3, len(diags))
    nrows = math.ceil(len(diags) / ncols)
    fig = _new_figure(0.8 + ncols * (1.6 + cell * T), 0.5 + nrows * (1.4 + cell * T))
    fig.set_layout_engine("constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(diags):]:
        ax.set_visible(False)
    axes = axes[: len(diags)]
    annot = 7 if T <= 5 else 6
    im = None
    for ax, (init, d) in zip(axes, diags):
        tasks = list(d["tasks"])
        mat = [[float(v) if is_number(v) and v > 0 else float("nan") for v in row] for row in d["ratio"]]
        im = ax.imshow(mat, cmap="viridis", norm=norm)
        n = len(tasks)
        ax.set_xticks(range(n), labels=tasks, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels=tasks, fontsize=8)
        ax.set_xlabel("task data j", fontsize=8)
        ax.set_ylabel("adapter i", fontsize=8)
        for i, row in enumerate(d["ratio"]):
            for j, v in enumerate(row):
                label = f"{v:.2g}" if is_number(v) else "nan"
                light = is_number(v) and v > 0 and norm(float(v)) > 0.6
                ax.text(j, i, label, ha="center", va="center", fontsize=annot, color="black" if light else "white")
        stage = "after OSRM" if is_osrm(results, init) else "before OSRM"
        ax.set_title(f"{init_label(results, init)}\n{stage}; mean off-diag {fmt(d.get('mean_offdiag_ratio'), '.3g')}",
                     fontsize=9)
    if im is not None:
        cb = fig.colorbar(im, ax=[ax for row in grid for ax in row], fraction=0.035, pad=0.02,
                          shrink=0.8 if nrows == 1 else 0.6)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle("Interference E‖ΔW_i h_j‖² / E‖ΔW_j h_j‖² (row adapter i, column task data j)\n"
                 f"{scale_text(scale)}, shared by all inits; {seed_text(results)}", fontsize=10)
    return fig


def interference_png(results: Mapping[str, Any]) -> bytes | None:
    """Annotated heatmaps of the interference ratio matrix, one per init (standard = before OSRM, OSRM
    inits = after), on one shared colour scale (logarithmic when the ratios span a range)."""
    fig = interference_figure(results)
    return None if fig is None else figure_png(fig)


def single_task_png(results: Mapping[str, Any]) -> bytes | None:
    """Grouped bars of single-task test scores per task (and average), one bar per init; a side panel
    with the mean A drift per init."""
    inits = init_names(results)
    tasks = list(results["tasks"])
    if not inits:
        return None
    colors = init_colors(results)
    metrics = results.get("metrics", {})
    labels = [f"{t}\n({metrics[t]})" if t in metrics else t for t in tasks] + ["average"]
    width = 0.8 / len(inits)
    fig = _new_figure(max(8.0, 3.5 + 0.9 * len(labels) + 0.3 * len(inits) * len(labels) / 2), 4.0)
    ax, ax_d = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3.2, 1]})
    for k, init in enumerate(inits):
        single = results["single_task"][init]
        ys = [_nan(single.get(t, {}).get("test")) for t in tasks] + [single_avg(results, init)]
        off = (k - (len(inits) - 1) / 2) * width
        bars = ax.bar([x + off for x in range(len(labels))], ys, width, color=colors[init],
                      label=init_label(results, init))
        _bar_labels(ax, bars, fontsize=6.5)
    ax.set_xticks(range(len(labels)), labels=labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("single-task test score (0..100)")
    ax.set_title("Single-task test scores (each task's own adapter, before merging)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    drift = []
    for init in inits:
        vals = [results["single_task"][init].get(t, {}).get("a_drift_mean") for t in tasks]
        vals = [float(v) for v in vals if is_number(v)]
        drift.append(sum(vals) / len(vals) if vals else float("nan"))
    bars = ax_d.bar(range(len(inits)), drift, color=[colors[i] for i in inits])
    _bar_labels(ax_d, bars, ".3f")
    ax_d.set_xticks(range(len(inits)), labels=inits, rotation=30, ha="right", fontsize=8)
    ax_d.set_title("A drift (mean relative change)", fontsize=10)
    finite = [d for d in drift if math.isfinite(d)]
    ax_d.set_ylim(0, max(finite + [0.01]) * 1.25)
    ax_d.grid(axis="y", alpha=0.3)
    ax_d.set_axisbelow(True)
    fig.tight_layout()
    return figure_png(fig)


def merge_cost_png(results: Mapping[str, Any]) -> bytes | None:
    """Horizontal bars: merge wall time at the selected lambda per (init, method); a second panel with
    peak memory when the records carry it."""
    recs = [r for r in merged_records(results) if is_number(r.get("merge_seconds"))]
    if not recs:
        return None
    colors = init_colors(results)
    has_mem = any(memory_mb(r) is not None for r in recs)
    fig = _new_figure(9.0 if has_mem else 7.0, 1.0 + 0.32 * len(recs))
    axes = fig.subplots(1, 2 if has_mem else 1, squeeze=False)[0]
    names = [f"{r['init']} / {r['method']}" for r in recs][::-1]
    cols = [colors.get(r["init"], "grey") for r in recs][::-1]
    panels = [("merge_seconds", "merge time at selected λ (s)")] + ([("memory", "peak memory (MB)")] if has_mem else [])
    for ax, (key, title) in zip(axes, panels):
        vals = [(_nan(memory_mb(r)) if key == "memory" else float(r["merge_seconds"])) for r in recs][::-1]
        bars = ax.barh(range(len(recs)), vals, color=cols)
        for b in bars:
            w = b.get_width()
            if math.isfinite(w):
                ax.annotate(f"{w:.2f}" if key != "memory" else f"{w:.0f}", (w, b.get_y() + b.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(recs)), labels=names, fontsize=8)
        ax.set_title(title, fontsize=10)
        finite = [v for v in vals if math.isfinite(v)]
        ax.set_xlim(0, max(finite + [1e-3]) * 1.2)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    return figure_png(fig)


FIGURES = {
    "normalised": normalised_bars_png,
    "robustness": lambda_curves_png,
    "interference": interference_png,
    "single-task": single_task_png,
    "merge-cost": merge_cost_png,
}
