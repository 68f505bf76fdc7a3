"""Vectorised text normalisation over Arrow string columns: whitespace collapsed (the key of exact
duplicate checks) and a strong form without case, punctuation or compatibility variants (the key of
near-duplicate checks). No per-row Python: each text is rewritten only where it has to be."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from prefloop.tasks.common.arrow import as_array

# RE2 (pyarrow.compute): every Unicode space separator and control whitespace, like Python's \s. RE2's \s
# lacks \v (\x0b), named here so that a row's normal form never depends on the other rows of its column.
_WHITESPACE = r"[\s\x{0b}\p{Z}\x{85}\x{1c}-\x{1f}]+"
# What makes a text differ from its whitespace-normalised form: whitespace other than a lone space, a
# double space, or a space at either end. Matching is much cheaper than replacing, so only the texts
# that match are rewritten.
_UNNORMALISED = (r"[\t\n\v\f\r\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
                 r"\x{205f}\x{3000}]|  |^ | $")
_RARE_WHITESPACE = r"[\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
_NOT_ALPHANUMERIC = r"[^\p{L}\p{N}]+"


def normalise_whitespace(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Every run of whitespace becomes one space, and the ends are trimmed."""
    column = as_array(column)
    needs = pc.fill_null(pc.match_substring_regex(column, _UNNORMALISED), False)
    if not pc.any(needs).as_py():
        return column
    texts = column.filter(needs)
    rare = pc.fill_null(pc.match_substring_regex(texts, _RARE_WHITESPACE), False)
    if pc.any(rare).as_py():
        rewritten = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, _WHITESPACE, " "))
    else:  # only ASCII whitespace: plain substring replacement is a few times faster than a regex
        for character in "\t\n\v\f\r":
            texts = pc.replace_substring(texts, character, " ")
        while pc.any(pc.match_substring(texts, "  ")).as_py():
            texts = pc.replace_substring(texts, "  ", " ")
        rewritten = pc.ascii_trim(texts, " ")
    return as_array(pc.replace_with_mask(column, needs, as_array(rewritten)))


def normalise_strongly(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """NFKC, lower case, and only letters and digits kept: the key of near-duplicate checks."""
    return as_array(pc.replace_substring_regex(pc.utf8_lower(pc.utf8_normalize(column, "NFKC")), _NOT_ALPHANUMERIC, ""))
