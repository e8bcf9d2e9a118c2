"""Conversations -> token ids and labels, with the loss on every assistant turn and nothing else.

A conversation is a list of {role, content} (schemas/messages.py normalises the OpenAI and
ShareGPT layouts to it; an Alpaca row is one user turn and one assistant turn). It is rendered
to one text, with the character span of each assistant turn known:

- `tokenize.template: model`: the tokenizer's own chat template (`apply_chat_template`). The span
  of assistant turn i runs from the end of the conversation before it rendered with the
  generation prompt (what the model is given at inference) to the end of the conversation
  through it (its content and the template's end-of-turn marker). Both must be prefixes of the
  whole rendering, which holds for templates that render each turn on its own; a template
  that rewrites earlier turns (e.g. drops past reasoning) fails with rule chat_template_prefix
  rather than mislabelling tokens.
- alpaca / chatml / plain (tasks/data/prompts.py, for models without a template): built turn by turn;
  each assistant turn ends with the tokenizer's EOS, as the single-turn path does.

The whole text is tokenized once (so the ids are what apply_chat_template would give), and a
token carries a label when it starts inside an assistant span (its offsets say where).
"""

from __future__ import annotations

from schemas.messages import normalize
from tasks.catalog import IGNORE_INDEX as IGNORE
from tasks.common import PipelineError
from tasks.data.prompts import ALPACA_NO_INPUT

HAND_TEMPLATES = ("alpaca", "chatml", "plain")
ALPACA_PREAMBLE = ALPACA_NO_INPUT.split("### Instruction:")[0]  # "Below is an instruction ...\n\n"


def from_instruction(instruction: str, input: str = "", output: str | None = None) -> list[dict]:
    """An Alpaca / Self-Instruct row as a conversation (the input joins the instruction)."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": user}] + (
        [{"role": "assistant", "content": output}] if output is not None else []
    )


def _check_template(tok) -> None:
    if not getattr(tok, "chat_template", None):
        raise PipelineError(
            f"tokenize.template is 'model' but the tokenizer of {tok.name_or_path!r} has no chat "
            f"template; choose one of {', '.join(HAND_TEMPLATES)} (tasks/data/prompts.py)"
        )


def _apply(tok, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. a template that refuses a system message)
        raise PipelineError(
            f"the chat template cannot render this conversation ({type(exc).__name__}: {exc}); "
            f"rule: chat_template_render"
        ) from None


def _render_model(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    _check_template(tok)
    text = _apply(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = _apply(tok, messages[:i], True), _apply(tok, messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise PipelineError(
                f"the chat template does not render turn {i + 1} as a prefix of the whole conversation, "
                f"so its assistant tokens cannot be located; use a hand-written template "
                f"(tokenize.template: {' / '.join(HAND_TEMPLATES)}); rule: chat_template_prefix"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _render_hand(tok, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """A hand-written template, turn by turn. A user turn ends with the assistant's opener, so a
    conversation ending with a user turn is the generation prompt, and one user + one assistant
    turn renders exactly as render_prompt(template, instruction) + answer + EOS."""
    eos = tok.eos_token or ""
    after_answer = {"alpaca": "\n\n", "chatml": "<|im_end|>\n", "plain": "\n"}[template]
    msgs = list(messages)
    text, spans = "", []
    if template == "alpaca":  # the system message replaces alpaca's preamble
        text = msgs.pop(0)["content"] + "\n\n" if msgs and msgs[0]["role"] == "system" else ALPACA_PREAMBLE
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if role == "assistant":
            spans.append((len(text), len(text) + len(content + eos)))
            text += content + eos + (after_answer if i < len(msgs) - 1 else "")
        elif template == "alpaca":
            text += f"### Instruction:\n{content}\n\n### Response:\n" if role == "user" else f"{content}\n\n"
        elif template == "chatml":
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n" + ("<|im_start|>assistant\n" if role == "user" else "")
        else:
            text += f"{content}\n"
    return text, spans


def render(tok, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation as one text, the character span of each assistant turn)."""
    if template == "model":
        return _render_model(tok, messages)
    if template not in HAND_TEMPLATES:
        raise PipelineError(f"tokenize.template: unknown template {template!r}")
    return _render_hand(tok, messages, template)


def _tokenize(tok, text: str, template: str):
    if not getattr(tok, "is_fast", False):
        raise PipelineError(
            f"chat data needs a fast (Rust) tokenizer for token offsets; {tok.name_or_path!r} has only a slow one"
        )
    # A model's template writes its own BOS; the hand-written ones get it from the tokenizer, as in the
    # instruction path.
    enc = tok(text, add_special_tokens=template != "model", return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def encode_conversation(tok, messages: list[dict], max_length: int, template: str) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are the ids on assistant-turn tokens, -100 elsewhere;
    rows longer than max_length are cut at max_length."""
    text, spans = render(tok, messages, template)
    ids, offsets = _tokenize(tok, text, template)
    labels = []
    for tid, (start, end) in zip(ids, offsets):
        # (0, 0): a token the tokenizer added (BOS), not text; otherwise a token is the assistant's
        # when it starts inside an assistant span.
        answer = end > start and any(a <= start < b for a, b in spans)
        labels.append(tid if answer else IGNORE)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def prompt_ids(tok, messages: list[dict], template: str) -> list[int]:
    """Token ids to generate the next assistant turn from (messages end with a user turn)."""
    if template == "model":
        _check_template(tok)
        text = _apply(tok, messages, True)
    else:
        text, _ = render(tok, messages, template)
    return _tokenize(tok, text, template)[0]


def conversation(row: dict) -> list[dict]:
    """The conversation of a split row: its messages, or an instruction row as one."""
    if "messages" in row and row["messages"] is not None:
        return normalize(row["messages"])
    return from_instruction(row["instruction"], row.get("input") or "", row.get("output"))


def encode_batch(batch: dict, tok, max_length: int, template: str) -> dict:
    """tokenize's causal-LM encoder (a batched Dataset.map function) for chat rows (a messages column,
    JSON text) or, with `template: model`, instruction rows: input_ids, labels, truncated."""
    n = len(batch["row"])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    out = {"input_ids": [], "labels": [], "truncated": []}
    for rec in rows:
        ids, labels, cut = encode_conversation(tok, conversation(rec), max_length, template)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(cut)
    return out


# --- validation (tasks/validate.py hooks here for chat data) ---------------------------------------


def resolve_layout(params, chunks):
    """(params with data.layout auto made definite, the same chunks): a causal-LM dataset is chat data
    when its first chunk has a messages or conversations column. Later stages read data.layout."""
    import itertools

    if params.task != "causal_lm" or params.data.layout != "auto":
        return params, chunks
    chunks = iter(chunks)
    first = next(chunks, None)
    layout = "messages" if first is not None and is_chat("auto", first.columns) else "instruction"
    params = params.model_copy(update={"data": params.data.model_copy(update={"layout": layout})})
    return params, (chunks if first is None else itertools.chain([first], chunks))


def classification_as_instruction(df, d, mapping: dict[str, int] | None, names: list[str], clean=None) -> None:
    """Give labelled rows (data.text_columns, data.label_column) the instruction layout in place:
    instruction data.question, input the text columns joined with '. ', output the label's name
    (left empty for a value that names no label, which the instruction contract then rejects; a
    row without the label column, as predict gets it, has no output)."""
    if not names:
        from tasks.common import PipelineError

        raise PipelineError("data.layout classification needs data.label_names: the names the model answers with")
    text = [
        df[c].map(lambda v: "" if not isinstance(v, str) else (clean(v) if clean else v.strip()))
        for c in d.text_columns
        if c in df
    ]
    joined = text[0].str.rstrip(".") if text else ""
    for t in text[1:]:  # as the classifier joins them (tasks/validate.joined_text)
        joined = joined.str.cat(t.str.rstrip("."), sep=". ")
    df["instruction"] = d.question.format(labels=", ".join(names))
    df["input"] = joined.str.strip()
    if d.label_column in df:
        df["output"] = df[d.label_column].map(lambda v: names[mapping[str(v)]] if str(v) in mapping else None)


def is_chat(layout: str, columns) -> bool:
    """Whether data.layout (auto: by the columns found) makes these rows conversations."""
    from schemas.messages import COLUMNS

    return layout == "messages" or (layout == "auto" and any(c in columns for c in COLUMNS))


def prepare_frame(df, clean: bool, unique: bool, for_prediction: bool = False):
    """Bring chat rows to the contract's shape in place (a `messages` column of JSON text, contents
    stripped when clean, the prompt_key column) and return the contract (schemas/messages.py)."""
    import json

    from schemas.messages import KEY, ConversationError, messages_schema, problems, prompt_key

    if "messages" not in df and "conversations" in df:
        df["messages"] = df.pop("conversations")
    if "messages" not in df:  # reported as a missing column (prompt_key is derived, not asked for)
        return messages_schema(unique=False, for_prediction=for_prediction)
    keys = []
    for i, value in df["messages"].items():
        try:
            msgs = normalize(value) if value is not None else None
        except ConversationError:
            msgs = None
        if msgs is not None and clean:
            msgs = [{**m, "content": m["content"].strip()} for m in msgs]
            df.at[i, "messages"] = json.dumps(msgs, ensure_ascii=False)
        ok = msgs is not None and not problems(df.at[i, "messages"])
        keys.append(prompt_key(msgs) if ok else f"<row {i} breaks a rule: not a key>")
    if not for_prediction:  # the identity of a training row: duplicates and leakage are judged on it
        df[KEY] = keys
    return messages_schema(unique, for_prediction)


FEATURES = ("messages", "prompt_key")  # chat rows in data/validated and data/split (with source, row)


def canonical_columns(df) -> dict:
    """Validated chat rows as the split stage reads them: messages (JSON text of [{role, content}]) and
    prompt_key (dedup and leakage)."""
    import json

    from schemas.messages import KEY

    return {
        "messages": [json.dumps(normalize(v), ensure_ascii=False) for v in df["messages"]],
        "prompt_key": df[KEY].tolist(),
    }


def prediction_frame(df, row_column: str):
    """Validated conversations to answer: messages up to the last user turn, and `expected`, the
    final assistant turn when the conversation came with one (as a test row does)."""
    import pandas as pd

    prompts, expected = [], []
    for value in df["messages"]:
        msgs = normalize(value)
        answer = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None
        prompts.append(msgs)
        expected.append(answer)
    out = pd.DataFrame({"messages": prompts, "row": df[row_column].astype(str).tolist()})
    if any(e is not None for e in expected):
        out["expected"] = expected
    return out


def generation_prompts(tok, rows, template: str, max_length: int) -> list[list[int]]:
    """Prompt ids of prepared prediction rows (conversations, or instruction rows), keeping the
    last max_length tokens."""
    if "messages" in rows:
        convs = list(rows["messages"])
    else:
        convs = [from_instruction(ins, inp or "") for ins, inp in zip(rows["instruction"], rows["input"])]
    return [prompt_ids(tok, c, template)[-max_length:] for c in convs]
