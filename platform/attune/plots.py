"""Training curves as PNG files: a registry entry's (its loss, or its reward for a method that
learns from rewards), and each trial's of a search."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, on machines with no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_losses(history: list[dict], out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    rewarded = any("reward" in h or "eval_reward" in h for h in history)
    name = "reward" if rewarded else "loss"
    for key, label in ((name, f"train {name}"), (f"eval_{name}", f"eval {name}")):
        points = [h for h in history if key in h]
        if points:
            ax.plot([h["step"] for h in points], [h[key] for h in points], marker="." if rewarded
                    else None, label=label)
    ax.set(xlabel="step", ylabel=name, title=title, yscale="linear" if rewarded else "log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_metric_curves(curves: dict[str, tuple[list, list]], out: Path, metric: str) -> None:
    """One figure, a curve per name: name -> (steps, values)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, marker=".", label=name)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} per trial", yscale="log")
    if len(curves) <= 12:  # beyond, a legend covers the curves; curves/<trial>.png name them
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
