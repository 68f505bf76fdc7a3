"""Word n-gram contamination of prompts against evaluation prompts, for the filter stage.

A prompt's overlap is the fraction of its lower-cased whitespace-word n-grams that occur among the
evaluation prompts' n-grams (8-grams as in Tülu 3's decontamination); a prompt shorter than n words
is compared whole. N-grams are hashed (FNV-1a over word ids, then SplitMix64's finaliser) and matched
as 64-bit integers, vectorised over all prompts at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.tasks.common.arrow import as_array, as_mask


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of 64-bit values (vectorised, wraps mod 2⁶⁴)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _ngram_hashes(ids: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, 64-bit hash) of every word n-gram of every row whose words all have an id (≥ 0).

    ``ids`` are the rows' word ids end to end, ``lengths`` the number of words of each row.
    """
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    ends = np.cumsum(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)[:count]
    valid = np.arange(count) + n <= ends[rows]  # the n-gram stays inside its row
    unknown = np.concatenate([[0], np.cumsum(ids < 0)])  # an n-gram with an unknown word cannot match
    valid &= unknown[n:] - unknown[:count] == 0
    words = ids.astype(np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):  # FNV-1a over 64-bit words, then SplitMix64's finaliser
            hashes ^= words[offset:offset + count]
            hashes *= np.uint64(0x100000001B3)
        hashes = _splitmix(hashes[valid])
    return rows[valid], hashes


def _word_ids(texts: pa.Array | pa.ChunkedArray, vocabulary: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Lower-cased whitespace words of each text as ids into ``vocabulary`` (−1: not in it), the number of
    words per text, and the words themselves (a list array)."""
    words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)))
    lengths = as_array(pc.fill_null(pc.list_value_length(words), 0)).to_numpy().astype(np.int64)
    # Lower-case and look up each distinct word once, not every occurrence.
    encoded = as_array(pc.dictionary_encode(words.flatten()))
    distinct = pc.fill_null(pc.index_in(pc.utf8_lower(encoded.dictionary), value_set=vocabulary), -1)
    ids = as_array(distinct).to_numpy().astype(np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]
    return ids, lengths, words


def contamination_overlap(prompts: pa.Array | pa.ChunkedArray, eval_prompts: pa.Array | pa.ChunkedArray,
                          n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the fraction of its word n-grams found in any evaluation prompt, and whether it is short.

    Words are the whitespace-separated tokens of the lower-cased text. A prompt with fewer than ``n``
    words has no n-gram; its overlap is 1.0 when it equals an evaluation prompt (same words), else 0.
    N-grams are compared by a 64-bit hash (a false match has probability about 2⁻⁶⁴ per pair of n-grams).
    """
    eval_words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(eval_prompts))))
    vocabulary = pc.unique(eval_words.flatten())
    eval_ids, eval_lengths, _ = _word_ids(eval_prompts, vocabulary)
    ids, lengths, words = _word_ids(prompts, vocabulary)
    rows, hashes = _ngram_hashes(ids, lengths, n)
    _, eval_hashes = _ngram_hashes(eval_ids, eval_lengths, n)
    found = as_mask(pc.is_in(pa.array(hashes), value_set=pa.array(eval_hashes)))
    matched = np.bincount(rows[found], minlength=len(lengths))
    total = np.maximum(lengths - n + 1, 0)
    overlap = np.divide(matched, total, out=np.zeros(len(lengths)), where=total > 0)
    short = lengths < n
    if short.any():
        rows_short = np.flatnonzero(short)
        joined = pc.utf8_lower(pc.binary_join(words.take(pa.array(rows_short)), " "))
        whole = as_mask(pc.is_in(joined, value_set=as_array(pc.binary_join(eval_words, " ")).drop_null()))
        overlap[rows_short[whole]] = 1.0
    return overlap, short


def contaminated_rows(prompts: pa.Array | pa.ChunkedArray, eval_prompts: pa.Array | pa.ChunkedArray, n: int,
                      min_overlap: float) -> np.ndarray:
    """True for each row whose prompt's n-gram overlap with the evaluation prompts is at least ``min_overlap``.

    Pairs share prompts (several per prompt): each distinct prompt is measured once. A null prompt is
    never contaminated.
    """
    encoded = as_array(pc.dictionary_encode(prompts))
    overlap, _ = contamination_overlap(encoded.dictionary, eval_prompts, n)
    contaminated = np.append(overlap >= min_overlap, False)  # the last slot: a null prompt
    index = as_array(pc.fill_null(encoded.indices, len(encoded.dictionary))).to_numpy()
    return contaminated[index]
