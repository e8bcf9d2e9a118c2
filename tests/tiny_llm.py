"""A tiny Llama-architecture causal LM with random weights and a BPE tokenizer trained
offline on the Alpaca sample: exercises the causal-LM path with no hub access."""
from __future__ import annotations

import json
from pathlib import Path


def build_tiny_llama(out: Path, corpus_json: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = json.loads(Path(corpus_json).read_text())
    texts = [" ".join([r["instruction"], r["input"], r["output"]]) for r in rows]
    texts.append("Below is an instruction that describes a task ### Instruction: ### Input: ### Response:")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def save_random_llama(out: Path, **shape) -> str:
    """A Llama of the given shape with seeded random bf16 weights, saved (no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape)).to(torch.bfloat16).save_pretrained(out)
    return str(out)


# A chat template for the tiny Llama (its tokenizer has none): <|role|> headers, an assistant turn
# ends with EOS. Newlines are written as {{ '\n' }}: transformers renders templates with trim_blocks,
# which drops a newline written right after a block tag.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def build_tiny_chat_llama(out: Path, corpus_json: Path) -> Path:
    """The tiny Llama whose tokenizer carries CHAT_TEMPLATE (saved with it, as a chat model's is)."""
    from transformers import AutoTokenizer
    build_tiny_llama(out, corpus_json)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out
