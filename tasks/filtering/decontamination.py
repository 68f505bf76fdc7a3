"""Word n-gram contamination of prompts against evaluation prompts, for the filter stage.

A prompt's overlap is the fraction of its lower-cased whitespace-word n-grams that occur among the
evaluation prompts' n-grams (8-grams as in Tülu 3's decontamination); a prompt shorter than n words
is compared whole.

How it stays vectorised and cheap (no per-row Python): words become integer ids (their index in the
evaluation prompts' vocabulary, −1 for a word no evaluation prompt has), and an n-gram can only match if
its first two words form the first two words of some evaluation n-gram. That bigram test is exact (two
ids packed in one int64; a bitmap, then a hash set) and rejects all but a sliver of the positions of a
clean prompt, so the n-gram itself is hashed (FNV-1a over the word ids, then SplitMix64's finaliser)
only at the few positions that pass it, and matched as a 64-bit integer. Splitting the prompts into
words, most of the remaining time, runs on Arrow's CPU threads (``pyarrow.cpu_count()``: one under
``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.tasks.common.arrow import as_array, as_mask
from prefloop.tasks.filtering.dedup import splitmix64

_BLOCK = 1 << 18  # positions per block of the vectorised passes: their temporaries fit in a core's cache
_ROWS_PER_THREAD = 50_000  # below this many prompts per thread, one thread


def _hash_at(ids: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of the n word ids from each of ``starts``: FNV-1a over 64-bit words, then SplitMix64."""
    hashes = np.zeros(len(starts), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):
            hashes ^= ids[starts + offset].astype(np.uint64)
            hashes *= np.uint64(0x100000001B3)
        return splitmix64(hashes)


def _valid_starts(starts: np.ndarray, ids: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """The positions of ``starts`` whose n-gram stays inside its row and has only known words (id ≥ 0)."""
    rows = np.searchsorted(ends, starts, side="right")
    inside = starts + n <= ends[np.minimum(rows, len(ends) - 1)]
    starts = starts[inside]
    known = np.ones(len(starts), dtype=bool)
    for offset in range(n):
        known &= ids[starts + offset] >= 0
    return starts[known]


def _lead_keys(ids: np.ndarray, starts: np.ndarray, width: int, vocabulary_size: int) -> np.ndarray:
    """The first ``width`` (1 or 2) word ids of the n-grams at ``starts`` as one int64 (unknown words: −1,
    which no evaluation key has)."""
    first = ids[starts].astype(np.int64)
    return first if width == 1 else first * (vocabulary_size + 1) + ids[starts + 1]


def _lead_positions(ids: np.ndarray, width: int, vocabulary_size: int, eval_leads: pa.Array) -> np.ndarray:
    """Every position whose first ``width`` word ids are those of some evaluation n-gram (``eval_leads``), exactly.

    A bitmap over a multiplicative hash of the evaluation keys (about 256 slots per key, at most 2²⁴) drops
    nearly every other position for one multiply and one lookup, a block of positions at a time (so the
    temporaries stay in cache); the hash-set lookup (``is_in``) then runs only on the few that pass.
    """
    bits = int(min(24, max(10, np.ceil(np.log2(max(len(eval_leads), 1) * 256)))))

    def slots(keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)

    bitmap = np.zeros(1 << bits, dtype=bool)
    bitmap[slots(eval_leads.to_numpy(zero_copy_only=False))] = True
    count = len(ids) - width + 1
    maybe = [np.zeros(0, dtype=np.int64)]
    for low in range(0, max(count, 0), _BLOCK):
        high = min(count, low + _BLOCK)
        keys = ids[low:high].astype(np.int64)
        if width == 2:
            keys = keys * (vocabulary_size + 1) + ids[low + 1:high + 1]
        maybe.append(np.flatnonzero(bitmap[slots(keys)]) + low)
    positions = np.concatenate(maybe)
    keys = _lead_keys(ids, positions, width, vocabulary_size)
    return positions[as_mask(pc.is_in(pa.array(keys), value_set=eval_leads))]


def _ascii_without_low_separators(raw: np.ndarray) -> bool:
    """No byte ≥ 0x80 and none in 0x1C–0x1F, checked a block at a time (no full-size temporaries)."""
    for low in range(0, len(raw), _BLOCK * 8):
        block = raw[low:low + _BLOCK * 8]
        if block.max() >= 0x80 or ((block & 0xFC) == 0x1C).any():
            return False
    return True


def _word_ids(texts: pa.Array | pa.ChunkedArray, vocabulary: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Lower-cased whitespace words of each text as ids into ``vocabulary`` (int32, −1: not in it), the number
    of words per text, and the words themselves (a list array, lower-cased)."""
    texts = as_array(texts)
    offsets_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=offsets_type)[texts.offset:texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    # Arrow's ASCII word splitter is about twice as fast as its Unicode one and agrees with it on ASCII
    # text, except for the separators U+001C–U+001F (bytes 0x1C–0x1F), which only the Unicode one knows.
    if _ascii_without_low_separators(raw):
        words = as_array(pc.ascii_split_whitespace(pc.utf8_trim_whitespace(pc.ascii_lower(texts))))
    else:
        words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(texts))))
    lengths = as_array(pc.fill_null(pc.list_value_length(words), 0)).to_numpy().astype(np.int64)
    ids = as_array(pc.fill_null(pc.index_in(words.flatten(), value_set=vocabulary), -1)).to_numpy()
    return ids, lengths, words


def _word_ids_in_parallel(texts: pa.Array | pa.ChunkedArray,
                          vocabulary: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.ChunkedArray]:
    """:func:`_word_ids` of consecutive slices of ``texts`` on Arrow's CPU threads (its kernels release the GIL),
    concatenated: splitting and looking up every word is most of decontamination's time."""
    texts = as_array(texts)
    parts = min(pa.cpu_count(), max(1, len(texts) // _ROWS_PER_THREAD))
    if parts == 1:
        ids, lengths, words = _word_ids(texts, vocabulary)
        return ids, lengths, pa.chunked_array([words])
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="prefloop-decontamination") as pool:
        results = list(pool.map(lambda i: _word_ids(texts.slice(bounds[i], bounds[i + 1] - bounds[i]), vocabulary),
                                range(parts)))
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]),
            pa.chunked_array([r[2] for r in results]))


def _all_ngram_hashes(ids: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(start position, hash) of every n-gram of known words of every row (used on the evaluation side)."""
    ends = np.cumsum(lengths)
    starts = _valid_starts(np.arange(max(len(ids) - n + 1, 0)), ids, ends, n)
    return starts, _hash_at(ids, starts, n)


def contamination_overlap(prompts: pa.Array | pa.ChunkedArray, eval_prompts: pa.Array | pa.ChunkedArray,
                          n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the fraction of its word n-grams found in any evaluation prompt, and whether it is short.

    Words are the whitespace-separated tokens of the lower-cased text. A prompt with fewer than ``n``
    words has no n-gram; its overlap is 1.0 when it equals an evaluation prompt (same words), else 0.
    N-grams are compared by a 64-bit hash (a false match has probability about 2⁻⁶⁴ per pair of n-grams)
    after an exact test of their first two words.
    """
    eval_words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(eval_prompts))))
    vocabulary = pc.unique(eval_words.flatten())
    eval_ids, eval_lengths, _ = _word_ids(eval_prompts, vocabulary)
    ids, lengths, words = _word_ids_in_parallel(prompts, vocabulary)
    width = min(n, 2)
    eval_starts, eval_hashes = _all_ngram_hashes(eval_ids, eval_lengths, n)
    eval_leads = pa.array(_lead_keys(eval_ids, eval_starts, width, len(vocabulary)))
    # Positions whose first words lead some evaluation n-gram: exact, and few in a clean prompt.
    candidates = _lead_positions(ids, width, len(vocabulary), eval_leads)
    ends = np.cumsum(lengths)
    starts = _valid_starts(candidates[candidates + n <= len(ids)], ids, ends, n)
    found = starts[as_mask(pc.is_in(pa.array(_hash_at(ids, starts, n)), value_set=pa.array(eval_hashes)))]
    matched = np.bincount(np.searchsorted(ends, found, side="right"), minlength=len(lengths))
    total = np.maximum(lengths - n + 1, 0)
    overlap = np.divide(matched, total, out=np.zeros(len(lengths)), where=total > 0)
    short = lengths < n
    if short.any():
        rows_short = np.flatnonzero(short)
        joined = pc.binary_join(words.take(pa.array(rows_short)), " ")
        whole = as_mask(pc.is_in(joined, value_set=as_array(pc.binary_join(eval_words, " ")).drop_null()))
        overlap[rows_short[whole]] = 1.0
    return overlap, short


def _mostly_distinct(prompts: pa.Array, sample: int = 4096) -> bool:
    """Whether nearly every prompt is distinct, judged on evenly spread rows (deterministic, cheap)."""
    if len(prompts) <= 2 * sample:
        return False
    rows = pa.array(np.linspace(0, len(prompts) - 1, sample).astype(np.int64))
    return len(pc.unique(prompts.take(rows))) >= 0.9 * sample


def contaminated_rows(prompts: pa.Array | pa.ChunkedArray, eval_prompts: pa.Array | pa.ChunkedArray, n: int,
                      min_overlap: float) -> np.ndarray:
    """True for each row whose prompt's n-gram overlap with the evaluation prompts is at least ``min_overlap``.

    Pairs share prompts (several per prompt): each distinct prompt is measured once, unless nearly all of
    them are distinct anyway. A null prompt is never contaminated.
    """
    prompts = as_array(prompts)
    if _mostly_distinct(prompts):  # encoding would cost more than the repeats it saves
        return contamination_overlap(prompts, eval_prompts, n)[0] >= min_overlap  # a null prompt: no words, 0
    encoded = as_array(pc.dictionary_encode(prompts))
    overlap, _ = contamination_overlap(encoded.dictionary, eval_prompts, n)
    contaminated = np.append(overlap >= min_overlap, False)  # the last slot: a null prompt
    index = as_array(pc.fill_null(encoded.indices, len(encoded.dictionary))).to_numpy()
    return contaminated[index]
