"""Contract for chat data: one conversation per row, a list of messages.

Two layouts are read, per message: OpenAI's {"role", "content"} and ShareGPT's {"from", "value"}
(roles human/gpt are user/assistant); the column is `messages` or `conversations`. Readers hand
nested values over as JSON text (tasks/data/readers.py), so every rule parses the cell itself.

Rules (each named in the validation report, per row):
- messages_format: a JSON list of objects, each with a role and a text content;
- roles_known: every role is system, user or assistant;
- content_not_empty: no message is blank;
- turns_alternate: an optional system message first, then user and assistant alternate,
  starting with user (two user turns in a row would leave one unanswered, two assistant turns
  in a row one unprompted);
- has_assistant_turn: at least one assistant turn (a row without one trains nothing).
"""

from __future__ import annotations

import functools
import json

import pandera.pandas as pa

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", **{r: r for r in ROLES}}
COLUMNS = ("messages", "conversations")  # OpenAI, ShareGPT
RULES = ("messages_format", "roles_known", "content_not_empty", "turns_alternate", "has_assistant_turn")
KEY = "prompt_key"  # the dedup / leakage key column (see prompt_key)


class ConversationError(ValueError):
    def __init__(self, rule: str, detail: str):
        super().__init__(f"{detail}; rule: {rule}")
        self.rule = rule


def _raw_messages(value) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConversationError("messages_format", f"not JSON ({exc.msg})") from None
    if isinstance(value, dict):  # a whole record: {"messages": [...]} or {"conversations": [...]}
        value = next((value[c] for c in COLUMNS if c in value), value)
    if not isinstance(value, list) or not value:
        raise ConversationError("messages_format", "expected a non-empty list of messages")
    return value


def normalize(value) -> list[dict]:
    """[{"role", "content"}] from either layout (or JSON text of it); roles are kept as written
    apart from the ShareGPT aliases, so unknown roles reach their own rule. Raises
    ConversationError("messages_format") when the structure itself is wrong."""
    out = []
    for i, m in enumerate(_raw_messages(value), start=1):
        if not isinstance(m, dict):
            raise ConversationError("messages_format", f"message {i} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise ConversationError("messages_format", f"message {i} needs a text role/from and content/value")
        out.append({"role": ROLE_ALIASES.get(role.strip().lower(), role), "content": content})
    return out


def problems(value) -> tuple[str, ...]:
    """The rules this conversation breaks (empty: none). Each rule's check asks, so JSON text is
    parsed once per distinct value."""
    return _problems_of_text(value) if isinstance(value, str) else _problems(value)


@functools.lru_cache(maxsize=4096)
def _problems_of_text(value: str) -> tuple[str, ...]:
    return _problems(value)


def _problems(value) -> tuple[str, ...]:
    try:
        msgs = normalize(value)
    except ConversationError as exc:
        return (exc.rule,)
    broken = []
    roles = [m["role"] for m in msgs]
    unknown = any(r not in ROLES for r in roles)
    if unknown:
        broken.append("roles_known")
    if any(not m["content"].strip() for m in msgs):
        broken.append("content_not_empty")
    turns = roles[1:] if roles[0] == "system" else roles
    # (with an unknown role the order cannot be judged: roles_known says what is wrong)
    if not unknown and (not turns or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns))):
        broken.append("turns_alternate")
    if "assistant" not in roles:
        broken.append("has_assistant_turn")
    return tuple(broken)


def prompt_key(messages: list[dict]) -> str:
    """What identifies a conversation for deduplication and the no-leakage rule: every message
    before its last assistant turn (the prompt evaluation generates from), whitespace-trimmed.
    The same prompt in train and test would let the test answer be learned; the same prompt twice
    with different answers is a conflicting duplicate."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return json.dumps([[m["role"], m["content"].strip()] for m in messages[:last]], ensure_ascii=False)


def _rule_check(rule: str) -> pa.Check:
    return pa.Check(lambda v: rule not in problems(v), element_wise=True, name=rule)


def messages_schema(unique: bool = True, for_prediction: bool = False) -> pa.DataFrameSchema:
    """Rows with a `messages` column (a conversation as JSON text or a list) and, when unique,
    the prompt_key column tasks/validate.py derives from it. for_prediction: a conversation to
    answer needs no assistant turn (it ends with the user's; a final assistant turn is the reference)."""
    rules = [r for r in RULES if not (for_prediction and r == "has_assistant_turn")]
    columns = {"messages": pa.Column(object, checks=[_rule_check(r) for r in rules], nullable=False)}
    if unique:
        columns[KEY] = pa.Column(str, nullable=False)
    return pa.DataFrameSchema(
        columns,
        unique=[KEY] if unique else None,
        report_duplicates="exclude_first",
        strict=False,
        coerce=False,
        name="messages",
    )
