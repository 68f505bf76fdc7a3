"""Content ids that more than one stage computes the same way (a pair's id from its texts)."""

from __future__ import annotations

from prefloop.ids import content_id


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """The stable id of a preference pair: a hash of its prompt, chosen and rejected texts."""
    return content_id("pair", prompt, chosen, rejected)
