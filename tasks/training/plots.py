"""PNG plots people look at: the training loss curve and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(log: list[dict], path: Path, validation: list[dict] | None = None, best_step: int | None = None) -> None:
    """Training loss per step and, when validation passes ran, the validation loss on the same axes
    (the same quantity: mean over label tokens, or examples) and accuracy on a second axis."""
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    k = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, alpha=0.35, label="train loss")
    ax.plot(steps, smooth, label=f"train, moving mean ({k} steps)")
    lines = []
    if validation:
        vs = [r["step"] for r in validation]
        ax.plot(vs, [r["val_loss"] for r in validation], "o-", label="validation loss")
        if "val_accuracy" in validation[0]:
            acc = ax.twinx()
            lines = acc.plot(
                vs, [r["val_accuracy"] for r in validation], "s--", color="tab:green", label="validation accuracy"
            )
            acc.set_ylabel("validation accuracy")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"best step {best_step} (saved)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA training and validation loss" if validation else "LoRA training loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + lines, labels + [line.get_label() for line in lines], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 2), dpi=110)
    im = ax.imshow(matrix, cmap="Blues")
    top = max(max(r) for r in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, matrix[i][j], ha="center", va="center", color="white" if matrix[i][j] > top / 2 else "black")
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
