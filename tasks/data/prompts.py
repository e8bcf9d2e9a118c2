"""Prompt templates for instruction tuning. The loss covers only what follows the prompt."""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
    if template == "chatml":
        user = f"{instruction}\n\n{input}" if input else instruction
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "plain":
        return f"{instruction}\n{input}\n" if input else f"{instruction}\n"
    raise ValueError(f"unknown template {template!r}")
