"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_ppl_at_k(results: dict[str, Any], path: str | Path) -> Path:
    """ppl vs k, one colour per model: augmented (solid) and its Base alone (dashed), each
    with its bootstrap interval as a shaded band (when the results carry `ppl_ci`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(range(1, results["k"] + 1))
    for i, m in enumerate(results["models"]):
        color = f"C{i}"
        label = m["name"] if not m["augments"] else f"{m['name']} ({m['variant']}, N_L={m['n_latents']})"
        ax.plot(ks, m["ppl"], color=color, marker=".", label=label)
        _band(ax, ks, m.get("ppl_ci"), color)
        if m["augments"]:
            ax.plot(ks, m["ppl_base"], color=color, linestyle="--", label=f"{m['name']}: Base alone")
            _band(ax, ks, m.get("ppl_base_ci"), color, hatch="//")
            ax.axvline(m["n_ahead"], color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("k (token position after the augmentation)")
    ax.set_ylabel("perplexity of the k-th token")
    boot = results.get("bootstrap")
    bands = f"; bands: {100 * boot['level']:g}% bootstrap intervals" if boot else ""
    ax.set_title(f"ppl at k ({results['models'][0]['n_sites']} sites{bands})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _band(ax: Any, ks: list[int], ci: list[list[float]] | None, color: str, hatch: str | None = None) -> None:
    """Shade `[low, high]` per k (nothing for results without intervals)."""
    if ci is None:
        return
    low, high = zip(*ci, strict=True)
    ax.fill_between(ks, low, high, color=color, alpha=0.15, hatch=hatch, linewidth=0)
