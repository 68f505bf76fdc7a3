"""The running state of the filter chain (``stage.apply_filters``): which rows are still alive and the
reason each dropped row got, the metrics, and what several filters need computed once (normalised
texts, the policy's hidden states). It also names every reason, in the order the filters run.

Two questions about whitespace-normalised texts (:func:`~prefloop.tasks.common.text.normalise_whitespace`)
are answered without normalising every row: are two columns equal (``chosen_equals_rejected``), and which
rows repeat an earlier one (``duplicate_pair``). Rewriting a text is what costs; most rows can be told
apart by a key that normalisation cannot change — the bytes before the first and after the last byte that
could start whitespace (:func:`whitespace_invariant_key`) — and only rows whose keys agree are normalised
and compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.tasks.common.arrow import as_array, as_mask
from prefloop.tasks.common.text import normalise_whitespace
from prefloop.tasks.filtering.dedup import first_occurrences, repeated_keys
from prefloop.tasks.filtering.noise import Ensemble

if TYPE_CHECKING:
    from prefloop.tasks.filtering.stage import FilterConfig

FILTER_REASONS: tuple[str, ...] = (
    "nonfinite_score", "nonfinite_margin", "chosen_equals_rejected", "tie", "length_ratio", "contaminated",
    "duplicate_pair", "near_duplicate_pair", "similar_pair", "duplicate_prompt", "strength_negative", "strength_ambiguous",
    "ensemble_disagreement", "high_ches",
)
"""Every reason the filter stage can give, in the order the filters run."""

HiddenStates = Callable[[pa.Table], tuple[np.ndarray, ...]]
"""The policy's hidden-state sums of the rows of a table (:func:`~prefloop.tasks.filtering.ches.completion_hidden_states`)."""

_HIGH_BITS = np.uint64(0x8080808080808080)
_LOW_SEVEN = np.uint64(0x7F7F7F7F7F7F7F7F)
_TO_0X80_FROM_0X21 = np.uint64(0x5F5F5F5F5F5F5F5F)  # 0x21 + 0x5F = 0x80


def _string_bytes(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A string array's data bytes (at least 8; a copy only when shorter) and each row's start and end."""
    offsets_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=offsets_type)[column.offset:column.offset + len(column) + 1]
    data = column.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    if len(raw) < 8:
        raw = np.concatenate([raw, np.zeros(8 - len(raw), np.uint8)])
    return raw, offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)


def _words_at(raw: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The 8 bytes from each of ``positions`` as a little-endian uint64 (an unaligned load, no copy of ``raw``)."""
    view = np.ndarray(shape=(len(raw) - 7,), dtype="<u8", buffer=raw, strides=(1,))
    return view[positions].astype(np.uint64, copy=False)


def _up_to_first_stop(words: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each word's bytes before its first stop byte (later bytes zeroed), and whether byte 0 is a stop byte.

    Bytes at or past ``lengths`` count as stop bytes. SWAR: bit 7 of a byte of ``visible`` is set iff the byte
    is in 0x21–0x7F (adding 0x5F to its low seven bits carries into bit 7 iff it is ≥ 0x21; no carry crosses
    bytes); the lowest stop bit s then gives the mask of the bytes below it, (s >> 7) − 1.
    """
    visible = ((words & _LOW_SEVEN) + _TO_0X80_FROM_0X21) & ~words & _HIGH_BITS
    short = np.minimum(lengths, 8).astype(np.uint64) * np.uint64(8)
    inside = np.where(short >= 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                      (np.uint64(1) << np.minimum(short, np.uint64(63))) - np.uint64(1))
    stops = (~visible | ~inside) & _HIGH_BITS
    lowest = stops & (~stops + np.uint64(1))
    return words & ((lowest >> np.uint64(7)) - np.uint64(1)), (stops & np.uint64(0x80)) != 0


def _end_keys(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the (at most 8) bytes before its first stop byte and after its last, each as one uint64, and
    whether the row starts or ends with a stop byte. A stop byte is one that could begin whitespace in UTF-8:
    an ASCII control or space (≤ 0x20) or any byte of a multi-byte character (≥ 0x80)."""
    lengths = ends - starts
    with np.errstate(over="ignore"):
        at = np.minimum(starts, len(raw) - 8)  # a row in the last 7 bytes: load earlier, shift down
        head = _words_at(raw, at) >> ((starts - at).astype(np.uint64) * np.uint64(8))
        head, head_edge = _up_to_first_stop(head, lengths)
        # The tail, last byte first: a byte-swapped load ending at the row's end.
        at = np.maximum(ends - 8, 0)
        tail = _words_at(raw, at).byteswap() >> ((at - (ends - 8)).astype(np.uint64) * np.uint64(8))
        tail, tail_edge = _up_to_first_stop(tail, lengths)
    edge = (lengths > 0) & (head_edge | tail_edge)
    return head, tail, edge


def take_rows(column: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``column[rows]`` (ascending rows) taken chunk by chunk: a chunked take would first combine every chunk."""
    if not isinstance(column, pa.ChunkedArray):
        return column.take(pa.array(rows))
    bounds = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    parts = []
    for index, chunk in enumerate(column.chunks):
        low, high = np.searchsorted(rows, bounds[index:index + 2])
        if high > low:
            parts.append(chunk.take(pa.array(rows[low:high] - bounds[index])))
    return pa.concat_arrays(parts) if parts else pa.array([], column.type)


def whitespace_invariant_key(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, two uint64s that are equal for any two texts :func:`normalise_whitespace` makes equal.

    The key of a text t is (the bytes of n(t) before its first stop byte, those after its last), at most 8
    each, where n is the normalisation. For a text that neither starts nor ends with a stop byte these are
    t's own bytes: its first and last bytes lie inside its first and last word, every whitespace character
    begins with a stop byte, and n keeps words and only turns each run of whitespace into one space (itself
    a stop byte). Only the other rows (and nulls: key 0) are normalised here. Equal keys are necessary, not
    sufficient, for equal normalised texts: rows whose keys agree still need an exact comparison.
    """
    if isinstance(column, pa.ChunkedArray):  # chunk by chunk: combining would copy every text
        keys = [whitespace_invariant_key(chunk) for chunk in column.chunks]
        return (np.concatenate([k[0] for k in keys]) if keys else np.zeros(0, np.uint64),
                np.concatenate([k[1] for k in keys]) if keys else np.zeros(0, np.uint64))
    raw, starts, ends = _string_bytes(column)
    head, tail, edge = _end_keys(raw, starts, ends)
    if column.null_count:
        nulls = as_mask(pc.is_null(column))
        head[nulls], tail[nulls], edge[nulls] = 0, 0, False
    redo = np.flatnonzero(edge)
    if len(redo):
        normalised = as_array(normalise_whitespace(column.take(pa.array(redo))))
        raw, starts, ends = _string_bytes(normalised)
        head[redo], tail[redo], _ = _end_keys(raw, starts, ends)
    return head, tail


@dataclass
class ChainState:
    """What the filters share while they run: the table (after flips), each row's reason code (−1: alive),
    the metrics, and the normalised texts and hidden states computed once for every filter that needs them."""

    pairs: pa.Table
    config: FilterConfig
    eval_prompts: pa.Array | pa.ChunkedArray | None
    hidden_states: HiddenStates | None
    ensemble: Ensemble | None = None
    standard_error: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    codes: np.ndarray = field(init=False)
    _texts: dict[tuple[str, str], pa.Array] = field(default_factory=dict)
    _states: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.full(self.pairs.num_rows, -1, dtype=np.int16)

    @property
    def alive(self) -> np.ndarray:
        return self.codes < 0

    def reject(self, reason: str, mask: np.ndarray) -> None:
        """Drop the alive rows of ``mask`` for ``reason`` (a row keeps the first reason it gets)."""
        self.codes[mask & (self.codes < 0)] = FILTER_REASONS.index(reason)

    def text(self, column: str, normalise: Callable[[pa.ChunkedArray], pa.Array]) -> pa.Array:
        """``column`` normalised by ``normalise``, computed once."""
        key = (column, normalise.__name__)
        if key not in self._texts:
            self._texts[key] = normalise(self.pairs.column(column))
        return self._texts[key]

    def text_of(self, column: str, rows: np.ndarray) -> pa.Array:
        """``column`` at ``rows``, whitespace-normalised (from the whole normalised column when it exists)."""
        key = (column, normalise_whitespace.__name__)
        if key in self._texts:
            return self._texts[key].take(pa.array(rows))
        return as_array(normalise_whitespace(take_rows(self.pairs.column(column), rows)))

    def whitespace_key(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """:func:`whitespace_invariant_key` of ``column``, computed once."""
        key = (column, "whitespace_invariant_key")
        if key not in self._states:
            self._states[key] = whitespace_invariant_key(self.pairs.column(column))
        return self._states[key]

    def char_lengths(self, column: str) -> np.ndarray:
        """Characters per text of ``column`` (null: NaN): the byte length, read off the offsets, for a chunk
        whose bytes are all ASCII, else counted (``utf8_length``)."""
        lengths = []
        for chunk in self.pairs.column(column).chunks:
            raw, starts, ends = _string_bytes(chunk)  # chunks may share one buffer: look at this one's bytes only
            ascii_only = len(chunk) == 0 or int(raw[starts[0]:ends[-1]].max(initial=0)) < 0x80
            counted = pc.binary_length(chunk) if ascii_only else pc.utf8_length(chunk)
            lengths.append(counted.to_numpy(zero_copy_only=False))  # float with NaN where null, as a whole column
        return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    def equal_ignoring_whitespace(self, first: str, second: str) -> np.ndarray:
        """True where ``first`` and ``second`` are equal after :func:`normalise_whitespace` (null: False).

        Identical texts are equal; others are normalised and compared only where their
        :func:`whitespace_invariant_key` agrees.
        """
        a, b = self.pairs.column(first), self.pairs.column(second)
        same = as_mask(pc.equal(a, b))
        (a_head, a_tail), (b_head, b_tail) = self.whitespace_key(first), self.whitespace_key(second)
        candidates = ~same & (a_head == b_head) & (a_tail == b_tail)
        if a.null_count or b.null_count:
            candidates &= as_mask(pc.and_(pc.is_valid(a), pc.is_valid(b)))
        rows = np.flatnonzero(candidates)
        if len(rows):
            same[rows] = as_mask(pc.equal(self.text_of(first, rows), self.text_of(second, rows)))
        return same

    def repeats_ignoring_whitespace(self, columns: tuple[str, ...]) -> np.ndarray:
        """True for alive rows whose ``columns``, whitespace-normalised, equal those of an earlier alive row.

        Same result as :func:`~.dedup.first_occurrences` over the normalised columns, but only rows whose
        :func:`whitespace_invariant_key` tuple repeats among the alive rows are normalised and compared.
        """
        alive = np.flatnonzero(self.alive)
        keys = [part[alive] for column in columns for part in self.whitespace_key(column)]
        rows = alive[repeated_keys(keys)]
        repeated = np.zeros(self.pairs.num_rows, dtype=bool)
        if len(rows):
            texts = [self.text_of(column, rows) for column in columns]
            repeated[rows[first_occurrences(texts, np.ones(len(rows), dtype=bool))]] = True
        return repeated

    def states_of(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The policy's hidden-state sums of ``rows`` (sorted), each row computed once."""
        assert self.hidden_states is not None
        if "rows" not in self._states or not np.isin(rows, self._states["rows"]).all():
            self._states.update(rows=rows, states=self.hidden_states(self.pairs.take(pa.array(rows))))
        position = np.searchsorted(self._states["rows"], rows)
        return tuple(values[position] for values in self._states["states"])
