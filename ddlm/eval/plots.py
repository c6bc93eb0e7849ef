"""Plots of run directories: validation BPC against training steps, one line per run."""
from __future__ import annotations

from pathlib import Path

from ddlm.errors import DataError


def validation_curve(run_dir: str | Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, val_bpc, val_bpc_stderr) from a run's metrics.jsonl, in step order.

    A resumed run may log a step twice; the later line wins.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"'{run_dir}' has no metrics.jsonl")
    points: dict[int, tuple[float, float]] = {}
    from ddlm.eval.records import read_jsonl

    for row in read_jsonl(path):  # a torn last line (a kill mid-write) is skipped
        if row.get("split") == "valid" and "val_bpc" in row:
            points[int(row["step"])] = (float(row["val_bpc"]), float(row.get("val_bpc_stderr", 0.0)))
    if not points:
        raise DataError(f"'{path}' holds no validation rows")
    steps = sorted(points)
    return steps, [points[s][0] for s in steps], [points[s][1] for s in steps]


def plot_validation_curves(runs: dict[str, str | Path], out: str | Path, *, title: str = "",
                           reference: dict[str, float] | None = None,
                           points: dict[str, tuple[list[int], list[float]]] | None = None,
                           bands: dict[str, tuple[list[int], list[float], list[float]]] | None = None) -> Path:
    """Write a PNG of validation BPC vs step for each labelled run (a bound for diffusion methods),
    with ±1 standard-error bands, optional horizontal reference lines (label -> BPC), optional
    series measured elsewhere (label -> (steps, BPC)), drawn dashed, and optional summaries of
    several runs (label -> (steps, mean, spread)), drawn as the mean with a ±spread band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=120)
    for label, run_dir in runs.items():
        line_with_band(ax, label, *validation_curve(run_dir))
    for label, (steps, mean, spread) in (bands or {}).items():
        line_with_band(ax, label, steps, mean, spread, linewidth=2)
    for label, (steps, bpc) in (points or {}).items():
        ax.plot(steps, bpc, marker="s", markersize=4, linestyle="--", label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (ax.get_xlim()[1], value), xytext=(-4, 3), textcoords="offset points",
                    ha="right", fontsize=8, color="grey")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BPC (diffusion: upper bound)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)  # beside the data
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def line_with_band(ax, label: str, steps: list[int], values: list[float], spread: list[float], **style) -> None:
    """values against steps, with a shaded band of ±spread around them."""
    line, = ax.plot(steps, values, marker="o", markersize=3, label=label, **style)
    ax.fill_between(steps, [v - e for v, e in zip(values, spread)], [v + e for v, e in zip(values, spread)],
                    color=line.get_color(), alpha=0.2, linewidth=0)
