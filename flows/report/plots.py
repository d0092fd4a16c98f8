"""Report plots: each function draws one chart and returns an ``<img>`` with the PNG inlined (base64).

Inputs are plain lists/dicts of numbers already validated by :mod:`flows.report.inputs`. Same data => same bytes.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable

MAX_CLASSES_LABELLED = 60  # above this, the per-class chart drops tick labels (a bar per class is still drawn)


def png(draw: Callable, size: tuple[float, float]) -> str:
    """Draw on a fresh Agg figure and return an <img> with the PNG inlined.

    The object API (Figure + FigureCanvasAgg) never touches pyplot's global backend or figure registry, so the
    report can render inside a Prefect worker, a test process or a notebook alike; ``Software: None`` drops the
    only metadata that would change the bytes between matplotlib installs of the same version.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    alt = draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(str(alt), quote=True)}" src="data:image/png;base64,{data}">'


def funnel_plot(labels: list[str], counts: list[int]) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        y = list(range(len(labels)))
        ax.barh(y, counts, color="#4c72b0")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()  # first stage on top, as a funnel reads
        ax.set_xlabel("rows")
        ax.set_title("rows after each stage")
        top = max(counts) if counts else 1
        for yi, c in zip(y, counts):
            ax.text(c + top * 0.01, yi, f"{c:,}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.15 or 1)
        return "filter funnel: rows after each stage"
    return png(draw, (7, 0.45 * len(labels) + 1.2))


def entry_counts_plot(series: list[tuple[str, list[int]]], t: float | None) -> str:
    """Each (label, counts sorted descending) as a rank/count curve, log-log, with t as a line."""
    def draw(fig):
        ax = fig.add_subplot()
        for (label, counts), style in zip(series, ("-", "--", "-.", ":")):
            if counts:
                ax.plot(range(1, len(counts) + 1), counts, style, label=f"{label} ({len(counts):,} entries)",
                        drawstyle="steps-post")
        if t is not None:
            ax.axhline(t, color="#c44e52", linewidth=1, label=f"t = {t:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entry rank (by count, descending)")
        ax.set_ylabel("pairs matching the entry")
        ax.set_title("entry-count distribution: head flattened, tail kept")
        ax.legend(fontsize=8)
        return "entry counts sorted descending against rank, log-log, " + ", ".join(label for label, _ in series)
    return png(draw, (7, 4))


def curve_plot(steps: list[float], values: list[float], ylabel: str) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        ax.plot(steps, values, color="#4c72b0")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step")
        return f"{ylabel} against training step"
    return png(draw, (4.6, 3.2))


def per_class_plot(name: str, per_class: dict[str, float]) -> str:
    items = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    n = len(items)
    labelled = n <= MAX_CLASSES_LABELLED

    def draw(fig):
        ax = fig.add_subplot()
        y = list(range(n))
        ax.barh(y, [100 * v for _, v in items], color="#55a868")
        if labelled:
            ax.set_yticks(y, [c for c, _ in items], fontsize=8)
            for yi, (_, v) in zip(y, items):  # a 0% class has no visible bar; the number says it was measured
                ax.text(100 * v + 1, yi, f"{100 * v:.1f}", va="center", fontsize=7)
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{n} classes, sorted by accuracy")
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("zero-shot accuracy (%)")
        ax.set_title(f"{name}: zero-shot accuracy per class")
        return f"{name}: zero-shot accuracy per class"
    height = (0.22 * n + 1.2) if labelled else 4.0
    return png(draw, (7, min(height, 16)))
