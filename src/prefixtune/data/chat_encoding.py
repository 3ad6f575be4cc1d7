"""Chat examples as token ids: the model's chat template renders the whole conversation, and the
loss is taken on every assistant turn (its content and the end-of-turn mark the template closes
it with), -100 elsewhere.

Each assistant turn's span is found by rendering growing prefixes of the conversation: the text
before turn i is the template on ``messages[:i]`` with the generation prompt, the text through it
the template on ``messages[:i + 1]``; both must be prefixes of the whole rendering (so templates
without ``{% generation %}`` tags work). ``input_ids`` are exactly the whole rendering tokenized
(``add_special_tokens=False``: the template writes BOS itself), and the ids before the last
assistant turn are what :func:`chat_prompt_ids` feeds a model at evaluation and in the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefixtune.data.chat import prompt_messages, with_system
from prefixtune.data.encoding import IGNORE_INDEX, Encoded
from prefixtune.data.records import DataError, Example


def example_where(example: Example, index: int) -> str:
    """``FILE line N`` for an example read from a JSONL file, else ``example N`` (1-based)."""
    meta = example.meta
    if meta.get("file") and meta.get("line"):
        return f"{meta['file']} line {meta['line']}"
    return f"example {index + 1}"


def chat_template_of(tokenizer: Any, what: str = "chat data ({'messages': [...]} lines)") -> str:
    """The tokenizer's chat template, or a DataError saying ``what`` needs one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise DataError(f"{what} needs a chat template, and this model's tokenizer has "
                        "none: use a chat model (e.g. --model smollm2) or source/target "
                        "data")  # fmt: skip
    return template


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str,
           generation_prompt: bool = False) -> str:  # fmt: skip
    """The template's text for ``messages`` (with the assistant's turn opened if asked)."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], chat_template=template,
                                         tokenize=False,
                                         add_generation_prompt=generation_prompt)  # fmt: skip


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str,
                    system: str = "") -> list[int]:  # fmt: skip
    """Ids a model is prompted with for ``messages``: the system default put first where there
    is no system message, rendered with the generation prompt (as the server's chat route)."""
    text = render(tokenizer, with_system(messages, system), template, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def example_prompt_ids(
    tokenizer: Any, example: Example, template: str, system: str = ""
) -> list[int]:
    """Evaluation prompt of a chat example: its turns before the last assistant turn."""
    return chat_prompt_ids(tokenizer, prompt_messages(example.messages), template, system)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str,
                    where: str) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """(whole rendering, [(start, end) character span of each assistant turn])."""
    full = render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], template)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template renders messages[{i}] (assistant) "
                            "differently as the last turn than inside the conversation, so its "
                            "tokens cannot be told apart; use a template that renders "
                            "growing prefixes alike")  # fmt: skip
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def encode_chat_one(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str,
                    where: str, max_tokens: int | None,
                    limit_hint: str = "") -> Encoded:  # fmt: skip
    """input_ids of the whole rendering; labels = ids on the assistant spans, -100 elsewhere.
    A conversation over ``max_tokens`` is refused (never cut mid-turn)."""
    full, spans = assistant_spans(tokenizer, messages, template, where)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if max_tokens is not None and len(ids) > max_tokens:
        raise DataError(f"{where}: the conversation is {len(ids)} tokens once rendered with the "
                        f"chat template, over the limit of {max_tokens}{limit_hint}; shorten or "
                        "split it (conversations are never cut mid-turn)")  # fmt: skip
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets, strict=True)
    ]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{where}: no assistant token left to learn after tokenizing")
    return Encoded(ids, labels)


def encode_chat(examples: Sequence[Example], tokenizer: Any, *, template: str, system: str = "",
                max_tokens: int | None = None, limit_hint: str = "",
                indices: Sequence[int] | None = None) -> list[Encoded]:  # fmt: skip
    """Every chat example encoded (``system`` put first where a conversation has none);
    ``indices``: the examples' positions in their split, for errors without a file line."""
    out = []
    for n, example in enumerate(examples):
        where = example_where(example, indices[n] if indices is not None else n)
        messages = with_system(example.messages, system)
        out.append(encode_chat_one(tokenizer, messages, template, where, max_tokens, limit_hint))
    return out
