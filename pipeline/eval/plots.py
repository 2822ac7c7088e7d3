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


def plot_cross_capture(results: dict[str, Any], path: str | Path) -> Path:
    """Cross-capture heatmaps as paper 000 Fig. 4, one panel per model: cell (i, j) is the
    fraction of latent j's variance in latent i's τ-subspace (annotated when N_L <= 16)."""
    plt = _pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.4), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes[0], models, strict=True):
        h = m["H"]
        n_l = len(h)
        im = ax.imshow(h, vmin=0.0, vmax=1.0, cmap="viridis")
        if n_l <= 16:
            for i in range(n_l):
                for j in range(n_l):
                    ax.text(j, i, f"{h[i][j]:.2f}", ha="center", va="center", fontsize=max(5, 11 - n_l // 2),
                            color="black" if h[i][j] > 0.6 else "white")
        ticks = list(range(n_l)) if n_l <= 16 else list(range(0, n_l, max(1, n_l // 8)))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("latent j (variance captured)")
        ax.set_ylabel("latent i (subspace)")
        h_off = "–" if m["H_off"] is None else f"{m['H_off']:.4f}"
        ax.set_title(f"{m['name']} ({m['variant']})\nH_off = {h_off}, n = {m['n'][0]}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"cross-capture H (τ = {results['tau']})", fontsize=11)
    return _save(fig, path)


def plot_silhouettes(results: dict[str, Any], path: str | Path) -> Path:
    """Per-latent mean silhouette as bars, one panel per model; the dashed line is the global mean."""
    plt = _pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes[0], models, strict=True):
        per = m["silhouette_per_latent"] or []
        xs = list(range(1, len(per) + 1))
        ax.bar(xs, per, color=["C0" if s >= 0 else "C3" for s in per])
        if m["silhouette"] is not None:
            ax.axhline(m["silhouette"], color="black", linestyle="--", linewidth=1,
                       label=f"global s = {m['silhouette']:+.3f}")
            ax.legend(fontsize=8)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_ylim(-1, 1)
        ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 8)])
        ax.set_xlabel("latent")
        ax.set_ylabel("mean silhouette")
        ax.set_title(f"{m['name']} ({m['variant']})", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
