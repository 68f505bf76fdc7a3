"""Hashed duplicate detection over Arrow key columns, for the filter stage.

:func:`first_occurrences` marks the rows whose key tuple an earlier row already had (``duplicate_pair``,
``near_duplicate_pair``); :func:`beyond_first` marks the rows past the first ``limit`` with the same key
(``duplicate_prompt``). Both look only at the rows still alive, so a row an earlier filter dropped
never makes a later one look like a duplicate, and both keep the earliest rows, in table order.
Keys are compared through their dictionary codes, with no per-row Python. :func:`repeated_keys` is the
cheap first pass over integer keys (e.g. :func:`~.chain.whitespace_invariant_key`) that tells which rows
need the exact comparison at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.tasks.common.arrow import as_array


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of 64-bit values (vectorised, wraps mod 2⁶⁴)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def repeated_keys(keys: Sequence[np.ndarray]) -> np.ndarray:
    """True for rows whose tuple of integer ``keys`` (equal-length arrays) occurs in more than one row.

    The tuple is hashed to one uint64 (SplitMix64 chained over the parts) and counted through a hash
    table (Arrow's dictionary encoding, linear time): a collision can only add rows, never miss one.
    """
    if not keys or len(keys[0]) == 0:
        return np.zeros(len(keys[0]) if keys else 0, dtype=bool)
    combined = np.zeros(len(keys[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            combined = splitmix64(combined ^ key.astype(np.uint64, copy=False))
    codes = as_array(pc.dictionary_encode(pa.array(combined))).indices.to_numpy()
    return np.bincount(codes)[codes] > 1


def first_occurrences(keys: Sequence[pa.Array], alive: np.ndarray) -> np.ndarray:
    """True for alive rows whose key tuple already appeared in an earlier alive row (the first is kept).

    Keys are hashed one column at a time (dictionary codes), and a column is only hashed for the rows
    whose earlier columns already repeat — put the cheapest, most selective key first (the prompt).
    """
    rows = np.flatnonzero(alive)
    group = np.zeros(len(rows), dtype=np.int64)
    for key in keys:
        if len(rows) == 0:
            break
        codes = as_array(pc.dictionary_encode(key.take(pa.array(rows)))).indices
        codes = as_array(pc.fill_null(codes, -1)).to_numpy().astype(np.int64) + 1
        _, group, counts = np.unique(group * (int(codes.max()) + 1) + codes, return_inverse=True,
                                     return_counts=True)
        shared = counts[group] > 1
        rows, group = rows[shared], group[shared]
    repeated = np.zeros(len(alive), dtype=bool)
    first = np.zeros(len(rows), dtype=bool)
    first[np.unique(group, return_index=True)[1]] = True  # rows are in table order: the earliest of each
    repeated[rows[~first]] = True
    return repeated


def beyond_first(keys: pa.Array, alive: np.ndarray, limit: int) -> np.ndarray:
    """True for alive rows that come after the first ``limit`` alive rows with the same key."""
    rows = np.flatnonzero(alive)
    beyond = np.zeros(len(alive), dtype=bool)
    if len(rows) == 0:
        return beyond
    codes = as_array(pc.dictionary_encode(keys.take(pa.array(rows)))).indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    group_start = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(rows)) - np.repeat(group_start, np.diff(np.r_[group_start, len(rows)]))
    beyond[rows[order[rank >= limit]]] = True
    return beyond
