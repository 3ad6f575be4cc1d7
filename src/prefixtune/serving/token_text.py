"""One token as text for log-probability replies: its decoded text, or, when the token holds
only part of a UTF-8 character, OpenAI's "bytes:\\xNN" form of its raw bytes (so tokens that
each decode to U+FFFD stay distinct)."""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The raw bytes a token stands for (byte-level BPE or byte-fallback pieces), else the
    UTF-8 of its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        decoder = _byte_decoder()
        if piece and all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8")


def token_text(tokenizer: Any, token: int) -> str:
    """The token's text, or "bytes:\\xNN..." when it is not whole UTF-8 on its own."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
