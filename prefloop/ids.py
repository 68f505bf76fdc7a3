"""Stable row ids: short hashes of a row's defining content."""

from __future__ import annotations

import hashlib


def content_id(*parts: str | int | float | None, length: int = 16) -> str:
    """sha256 over the parts (separated unambiguously), as ``length`` hex characters."""
    digest = hashlib.sha256()
    for part in parts:
        text = "" if part is None else str(part)
        digest.update(len(text).to_bytes(8, "big"))
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:length]
