"""Plot the per-step losses that bench/gpu_qlora_bench.py printed: for each shape, the loss
of every recipe (top) and its difference from the all-fp32 reference's where the file has
one, else from the plain recipe's (bottom).

    python bench/plot_loss_curves.py bench/results/X.jsonl [more.jsonl ...] -o out.png
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"plain-hf": ("k", "--"), "fp32-reference": ("tab:blue", ":")}  # others: by recipe or precision mode
VARIANTS: dict = {}


def style(recipe: str) -> tuple[str, str]:
    if recipe in STYLE:
        return STYLE[recipe]
    if recipe.startswith("unsloth"):
        return "tab:purple", "-."
    if recipe == "qlora-flow[auto]":
        return "tab:green", "-"
    if recipe.startswith("qlora-flow[auto+"):  # a lever changed: one colour each, in the order first seen
        others = ("tab:cyan", "tab:olive", "tab:brown", "tab:pink", "tab:blue")
        return VARIANTS.setdefault(recipe, others[len(VARIANTS) % len(others)]), "-"
    return ("tab:red" if "bf16" in recipe else "tab:orange" if "mixed" in recipe else "tab:grey"), "-"


def read(paths: list[str]) -> dict:
    """{shape: {recipe: losses}} from the benchmark's JSON lines (later files win)."""
    curves: dict = {}
    for path in paths:
        for line in open(path):
            row = json.loads(line) if line.strip().startswith("{") else {}
            if "losses" in row:
                curves.setdefault(row["shape"], {})[row["recipe"]] = row["losses"]
    return curves


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    curves = read(a.jsonl)
    fig, axes = plt.subplots(2, len(curves), figsize=(6 * len(curves), 7), squeeze=False, sharex="col")
    for col, (shape, recipes) in enumerate(sorted(curves.items())):
        base_name = "fp32-reference" if "fp32-reference" in recipes else "plain-hf"
        base = recipes[base_name]
        for recipe, losses in recipes.items():
            steps = range(1, len(losses) + 1)
            color, line = style(recipe)
            axes[0][col].plot(steps, losses, color=color, ls=line, label=recipe)
            axes[1][col].plot(steps, [x - y for x, y in zip(losses, base)], color=color, ls=line, label=recipe)
        axes[0][col].set_title(f"{shape}: training loss, same seed and batch")
        axes[1][col].set_title(
            f"loss minus the {'all-fp32 reference' if base_name != 'plain-hf' else 'plain recipe'}'s"
        )
        axes[1][col].set_xlabel("step")
        axes[1][col].axhline(0, color="grey", lw=0.5)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
