"""The report's PNG plots (matplotlib, imported only here and only when a report is drawn)."""
from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError
from placement.slo_metrics import BREAKDOWN

COLORS = {"disaggregated": "#1f77b4", "colocated-prefill-first": "#d62728", "colocated-chunked": "#2ca02c",
          "mixed": "#9467bd"}
LABELS = {"disaggregated": "disaggregated", "colocated-prefill-first": "colocated, prefill first",
          "colocated-chunked": "colocated, chunked prefill", "mixed": "mixed (colocated beside P/D)"}
SIZE, DPI = (5.2, 3.3), 80      # small PNGs: they are committed with the report


def require_matplotlib() -> None:
    """matplotlib is the `report` extra, not a core dependency: say how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("report plots need matplotlib, which is not installed: "
                          "pip install 'disagg-serve[report]'") from None


def _figure():
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, legend=True) -> str:
    if legend:
        ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_all(report: dict, out: Path) -> dict[str, str]:
    """Draw every plot, each in a worker process of its own (placement/parallel.py; pyplot
    is imported here first, so the workers inherit it); returns {plot name: file name}."""
    from placement.parallel import run_all
    _figure()[0].close("all")
    return dict(run_all([lambda draw=draw: draw(report, out) for draw in PLOTS]))


def _attainment_vs_rate(report: dict, out: Path) -> tuple[str, str]:
    systems, target = report["systems"], report["slo"]["attainment"]
    plt, fig, ax = _figure()
    for name, s in systems.items():
        ax.plot([p["rate"] for p in s["attainment_vs_rate"]], [p["attainment"] for p in s["attainment_vs_rate"]],
                "o-", ms=3, color=COLORS[name], label=LABELS[name])
    ax.axhline(target, color="gray", ls="--", lw=1)
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", title="Attainment vs rate")
    return "attainment_vs_rate", _save(plt, fig, ax, out / "attainment_vs_rate.png")


def _attainment_vs_slo_scale(report: dict, out: Path) -> tuple[str, str]:
    systems, target = report["systems"], report["slo"]["attainment"]
    plt, fig, ax = _figure()
    for name, s in systems.items():
        pts = s["at_reference_rate"]["attainment_vs_slo_scale"]
        ax.plot([p["scale"] for p in pts], [p["attainment"] for p in pts], "o-", ms=3, color=COLORS[name],
                label=LABELS[name])
    ax.axhline(target, color="gray", ls="--", lw=1)
    ax.set(xlabel="SLO scale (x TTFT and TPOT targets)", ylabel="SLO attainment",
           title=f"Attainment vs SLO scale at {report['reference_rate']:.3g} req/s")
    return "attainment_vs_slo_scale", _save(plt, fig, ax, out / "attainment_vs_slo_scale.png")


def _goodput_per_device(report: dict, out: Path) -> tuple[str, str]:
    systems, target = report["systems"], report["slo"]["attainment"]
    plt, fig, ax = _figure()
    names = list(systems)
    values = [systems[n]["goodput_per_device"] for n in names]
    ax.bar(range(len(names)), values, color=[COLORS[n] for n in names])
    ax.set_xticks(range(len(names)), [LABELS[n].replace(", ", ",\n") for n in names], fontsize=7)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="goodput per GPU (req/s)", title=f"Per-GPU goodput at {target:.0%} attainment")
    return "goodput_per_device", _save(plt, fig, ax, out / "goodput_per_device.png", legend=False)


def _cdf(report: dict, out: Path, metric: str, title: str) -> tuple[str, str]:
    systems, limit = report["systems"], report["slo"][f"{metric}_s"]
    plt, fig, ax = _figure()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    for name, s in systems.items():
        cdf = s["at_reference_rate"][f"{metric}_cdf"]
        ax.plot([v * 1000 if v is not None else None for v in cdf["value_s"]], cdf["fraction"],
                color=COLORS[name], label=LABELS[name])
    ax.axvline(limit * 1000, color="gray", ls="--", lw=1)
    ax.set(xlabel=f"{title} (ms, log scale)", ylabel="fraction of requests",
           title=f"{title} CDF at {report['reference_rate']:.3g} req/s")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return f"{metric}_cdf", _save(plt, fig, ax, out / f"{metric}_cdf.png")


def _ttft_breakdown(report: dict, out: Path) -> tuple[str, str]:
    systems = report["systems"]
    names = list(systems)
    plt, fig, ax = _figure()
    bottom = [0.0] * len(names)
    for part, color in zip(BREAKDOWN, ("#9ecae1", "#3182bd", "#fdae6b", "#e6550d")):
        vals = [systems[n]["at_reference_rate"]["breakdown_mean_s"][part] * 1000 for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(names)), [LABELS[n].replace(", ", ",\n") for n in names], fontsize=7)
    ax.set(ylabel="mean time (ms)", title="TTFT breakdown (+ transfer, decode queue)")
    return "ttft_breakdown", _save(plt, fig, ax, out / "ttft_breakdown.png")


PLOTS = (_attainment_vs_rate, _attainment_vs_slo_scale, _goodput_per_device,
         lambda report, out: _cdf(report, out, "ttft", "TTFT"), lambda report, out: _cdf(report, out, "tpot", "TPOT"),
         _ttft_breakdown)
