"""Chat conversations: checked ``{"role", "content"}`` messages and the Example that holds them.

A chat Example keeps the whole conversation in ``messages``; its ``target`` (and only
reference) is the content of the LAST assistant turn, and its ``source`` a readable rendering
of the turns before it (``"user: ..."`` lines), used only for display and grouping. Token ids
come from the model's chat template (``data/encoding.py``), never from ``source``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefixtune.data.records import DataError, Example

ROLES = ("system", "user", "assistant")


def validate_messages(messages: object, where: str) -> tuple[dict[str, str], ...]:
    """``messages`` as a tuple of ``{"role", "content"}`` dicts, or one DataError naming ``where``.

    Roles are system/user/assistant, contents strings (kept verbatim), at least one assistant
    turn with non-blank content. Keys other than role/content are ignored.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, Mapping):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            raise DataError(f"{at}.content must be a string, got {got}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}.content is empty (an assistant turn needs text to learn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: 'messages' has no assistant turn (nothing to train on)")
    return tuple(out)


def with_system(messages: Sequence[Mapping[str, str]], system: str) -> tuple[dict[str, str], ...]:
    """``messages`` with ``system`` as a first system message when it has none (and ``system``);
    a ``developer`` message (OpenAI's name for it) counts as the system turn."""
    msgs = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    if not system or any(m["role"] in ("system", "developer") for m in msgs):
        return msgs
    return ({"role": "system", "content": system}, *msgs)


def last_assistant(messages: Sequence[Mapping[str, str]]) -> int:
    """Index of the last assistant turn."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    raise DataError("conversation has no assistant turn")


def prompt_messages(messages: Sequence[Mapping[str, str]]) -> tuple[dict[str, str], ...]:
    """The turns before the last assistant turn: what a model is prompted with at evaluation."""
    return tuple(dict(m) for m in messages[: last_assistant(messages)])


def render_readable(messages: Sequence[Mapping[str, str]]) -> str:
    """``role: content`` lines (whitespace collapsed): a display form, never tokenized."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split())}" for m in messages)


def chat_example(messages: object, where: str, meta: Mapping[str, str] | None = None) -> Example:
    """A chat Example: the whole conversation, target = the last assistant turn's content."""
    msgs = validate_messages(messages, where)
    target = msgs[last_assistant(msgs)]["content"].strip()
    source = render_readable(prompt_messages(msgs))
    return Example(source, target, (target,), dict(meta or {}), msgs)
