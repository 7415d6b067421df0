"""Cutting text without breaking it: every header the connector writes and every cut it
makes goes through here, so a ``dlq-*`` header is always valid UTF-8.

A cut at a byte count can land inside a multi-byte character (issue 9: ``dlq-reason`` cut
at 1,000 bytes split one and made the header invalid UTF-8).
"""

from __future__ import annotations

HEADER_VALUE_MAX = 1000  # bytes, for every dlq-* header the connector writes


def cut_utf8(data: bytes, limit: int) -> bytes:
    """``data`` cut to at most ``limit`` bytes, before a character's first byte: the cut
    backs off over continuation bytes (at most 3, the longest UTF-8 tail). Bytes that are
    not UTF-8 there are cut at ``limit``."""
    if len(data) <= limit:
        return data
    if limit <= 0:
        return b""
    end = limit
    while end > limit - 3 and end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    if (data[end] & 0xC0) == 0x80:
        return data[:limit]
    return data[:end]


def header_text(text: str, limit: int = HEADER_VALUE_MAX) -> bytes:
    """A header value from text: valid UTF-8 (a lone surrogate becomes ``?``), at most
    ``limit`` bytes, cut at a character boundary."""
    return cut_utf8(text.encode("utf-8", "replace"), limit)
