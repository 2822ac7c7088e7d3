"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_ppl_at_k(results: dict[str, Any], path: str | Path) -> Path:
    """ppl vs k, one colour per model: augmented (solid) and its Base alone (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(range(1, results["k"] + 1))
    for i, m in enumerate(results["models"]):
        color = f"C{i}"
        label = m["name"] if not m["augments"] else f"{m['name']} ({m['variant']}, N_L={m['n_latents']})"
        ax.plot(ks, m["ppl"], color=color, marker=".", label=label)
        if m["augments"]:
            ax.plot(ks, m["ppl_base"], color=color, linestyle="--", label=f"{m['name']}: Base alone")
            ax.axvline(m["n_ahead"], color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("k (token position after the augmentation)")
    ax.set_ylabel("perplexity of the k-th token")
    ax.set_title(f"ppl at k ({results['models'][0]['n_sites']} sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
