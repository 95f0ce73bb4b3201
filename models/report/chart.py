"""Chart of a dtype report (models.report.fidelity): memory, speed and fidelity per precision.

Uses matplotlib's object API with the Agg/SVG canvases only (no pyplot, no GUI, no global state),
so it is safe on any thread. matplotlib is imported on first use.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

_FORMATS = {".png": "png", ".svg": "svg"}
_BOX = {"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.75, "lw": 0}
_COLORS = {"float32": "#4c72b0", "bfloat16": "#dd8452", "float16": "#55a868", "auto": "#8172b3"}
# quantized precisions, in the order they come (q8, q4, mxfp8, ...)
_QUANT_COLORS = ("#c44e52", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#2a9d8f", "#e76f51")


def _figure(result: dict):
    from matplotlib.figure import Figure

    dtypes = list(result.get("dtypes", {}))
    entries = [result["dtypes"][d] for d in dtypes]
    labels = [d if e.get("dtype", d) == d else f"{d}\n({e['dtype']})" for d, e in zip(dtypes, entries, strict=True)]
    quantized = iter(_QUANT_COLORS * 4)
    colors = [_COLORS.get(e.get("dtype", d)) or next(quantized) for d, e in zip(dtypes, entries, strict=True)]
    x = list(range(len(dtypes)))

    fig = Figure(figsize=(max(11.0, 1.4 * len(dtypes) + 2), 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    reference = result.get("reference", "float32")
    fig.suptitle(f"{result.get('model', 'model')}: dtypes against {reference} "
                 f"({result.get('probe_prompts', 0)} probe prompts)", fontsize=11)

    def bars(ax, values, title, fmt):
        heights = [v if isinstance(v, (int, float)) else 0 for v in values]
        rects = ax.bar(x, heights, color=colors)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, labels, fontsize=8)
        for rect, v in zip(rects, values, strict=True):
            text = fmt(v) if isinstance(v, (int, float)) else "n/a"
            ax.annotate(text, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.margins(y=0.18)

    sizes = [e.get("total_bytes") for e in entries]
    largest = max((b for b in sizes if isinstance(b, (int, float))), default=0)
    unit, scale = next(((u, f) for u, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if largest >= f),
                       ("bytes", 1))
    scaled = [b / scale if isinstance(b, (int, float)) else None for b in sizes]
    bars(axes[0], scaled, f"parameter memory ({unit}), bits per weight (text)", lambda v: f"{v:,.2f}")
    for i, e in enumerate(entries):
        if isinstance(e.get("bits_per_weight"), (int, float)):
            axes[0].annotate(f"{e['bits_per_weight']:.2f}\nbits", (i, 0), ha="center", va="bottom", fontsize=7,
                             xytext=(0, 4), textcoords="offset points", bbox=_BOX)

    decode = [e.get("decode_tok_s") for e in entries]
    prefill = [e.get("prefill_tok_s") for e in entries]
    batched = [e.get("decode_batch_tok_s") for e in entries]
    batch = result.get("speed", {}).get("batch")
    bars(axes[1], decode, "decode tokens/s at batch 1 (bar); prefill, batched (text)", lambda v: f"{v:,.0f}")
    for i, (p, b) in enumerate(zip(prefill, batched, strict=True)):
        lines = [f"prefill\n{p:,.0f}"] if isinstance(p, (int, float)) else []
        if isinstance(b, (int, float)):
            lines.append(f"batch {batch}\n{b:,.0f}" if batch else f"batched\n{b:,.0f}")
        if lines:
            axes[1].annotate("\n".join(lines), (i, 0), ha="center", va="bottom", fontsize=7,
                             xytext=(0, 4), textcoords="offset points", bbox=_BOX)

    agreement = [e.get("top1_agreement") for e in entries]
    bars(axes[2], agreement, "top-1 agreement (bar), KL mean/max (text)", lambda v: f"{v:.3f}")
    axes[2].set_ylim(0, 1.15)
    for i, e in enumerate(entries):
        kl_mean, kl_max = e.get("kl_mean"), e.get("kl_max")
        text = f"KL {kl_mean:.1e}\nmax {kl_max:.1e}" if kl_mean is not None and kl_max is not None else "KL n/a"
        if e.get("nonfinite_share"):
            text += f"\nnon-finite\n{e['nonfinite_share']:.2%}"
        axes[2].annotate(text, (i, 0.04), ha="center", va="bottom", fontsize=6.5, bbox=_BOX)
    return fig


def render_bytes(result: dict, fmt: str = "png") -> bytes:
    """The chart as PNG or SVG bytes."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"chart format must be png or svg, not {fmt!r}")
    fig = _figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    return buf.getvalue()


def render_svg(result: dict) -> str:
    """The chart as SVG text (for an HTTP response)."""
    return render_bytes(result, "svg").decode("utf-8")


def render_png(result: dict) -> bytes:
    return render_bytes(result, "png")


def render_chart(result: dict, path: str | os.PathLike) -> Path:
    """Write the chart to `path`; the format follows its suffix (.png or .svg)."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"chart path must end in .png or .svg, not {path.suffix or '(no suffix)'!r}")
    path.write_bytes(render_bytes(result, fmt))
    return path
