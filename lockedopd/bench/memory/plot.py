"""The memory plot of a run: memory per component per method, and seconds per step."""

from __future__ import annotations

from pathlib import Path

from lockedopd.bench.memory.methods import LEAN_MALLOC_SUFFIX, method_spec
from lockedopd.bench.memory.report import MIB, on_cuda

__all__ = ["COMPONENT_BARS", "CUDA_BARS", "plot_memory"]

#: (bar group label, record key); ``None`` = Adam moments + step counters
COMPONENT_BARS = (
    ("parameters", "param_bytes"),
    ("gradients", "grad_bytes"),
    ("Adam moments\n+ steps", None),
    ("bases", "basis_bytes"),
    ("saved for\nbackward", "saved_bytes"),
    ("peak live\ntensors", "peak_live_bytes"),
    ("peak anon\nRSS Δ", "peak_anon_delta_bytes"),
    ("peak RSS Δ\n(measured)", "peak_rss_delta_bytes"),
)


#: added on a CUDA student (``device: cuda``)
CUDA_BARS = (("GPU peak Δ\n(measured)", "cuda_peak_delta_bytes"),)


def _bars(report: dict) -> tuple[tuple[str, str | None], ...]:
    return COMPONENT_BARS + (CUDA_BARS if on_cuda(report["results"]) else ())


def _mib_values(record: dict, bars: tuple[tuple[str, str | None], ...]) -> list[float]:
    values = []
    for _, key in bars:
        value = record["moment_bytes"] + record["step_bytes"] if key is None else record.get(key)
        values.append(0.0 if value is None else value / MIB)
    return values


def plot_memory(report: dict, path: Path) -> None:
    """Grouped bars: memory per component per method (left), and seconds per step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lockedopd.runtime.plotting import distinct_colours, save_figure

    results = list(report["results"].values())
    bars_of = _bars(report)
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(20, 5.5), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / max(1, len(results))
    # one colour per method; a *_mmap method takes its twin's colour, hatched
    colours = distinct_colours(r["method"].removesuffix(LEAN_MALLOC_SUFFIX) for r in results)
    for i, r in enumerate(results):
        lean = method_spec(r["method"]).lean_malloc
        style = {
            "color": colours[r["method"].removesuffix(LEAN_MALLOC_SUFFIX)],
            "hatch": "///" if lean else None,
            "edgecolor": "white" if lean else None,
        }
        values = _mib_values(r, bars_of)
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(bars_of))]
        bars = ax.bar(xs, values, width, label=r["label"], **style)
        ax.bar_label(
            bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=6, rotation=90, padding=2
        )
        ax_t.bar(i, r["min_step_s"], **style)
    ax.set_xticks(range(len(bars_of)), [name for name, _ in bars_of])
    ax.set_ylabel("MiB")
    ax.set_title(f"{report['config']['name']}: memory per component (r = {report['config']['rank']})")
    ax.legend(fontsize=7, loc="upper left", ncol=2 if len(results) > 9 else 1)
    ax.margins(y=0.15)
    ax_t.set_xticks(range(len(results)), [r["method"] for r in results], rotation=45, ha="right", fontsize=8)
    ax_t.set_ylabel("seconds per step (min over timed steps)")
    ax_t.set_title("time per step (fwd + bwd + optimizer)")
    save_figure(fig, path, dpi=120)
