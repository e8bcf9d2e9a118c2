"""A tiny Llama-architecture causal LM with random weights and a BPE tokenizer trained
offline on the Alpaca sample: exercises the causal-LM path with no hub access. The builders
are bench/models.py's (the benchmarks build the same models); the chat template is the tests'."""

from __future__ import annotations

from pathlib import Path

from bench.models import build_tiny_llama, save_random_llama  # noqa: F401  (the tests' builders too)

# A chat template for the tiny Llama (its tokenizer has none): <|role|> headers, an assistant turn
# ends with EOS. Newlines are written as {{ '\n' }}: transformers renders templates with trim_blocks,
# which drops a newline written right after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_chat_llama(out: Path, corpus_json: Path) -> Path:
    """The tiny Llama whose tokenizer carries CHAT_TEMPLATE (saved with it, as a chat model's is)."""
    from transformers import AutoTokenizer

    build_tiny_llama(out, corpus_json)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out
