"""PNG plots people look at: the training loss curve and the confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(log: list[dict], path: Path) -> None:
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
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
            ax.text(j, i, matrix[i][j], ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black")
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
