"""The filter stage's fast paths give exactly what the slow, obvious computations give.

The oracles are the previous implementations, kept here verbatim in spirit: every text whitespace-normalised
before comparing, every word n-gram hashed before matching. They run on a few thousand random pairs that
carry every defect the rule filters look for, in every spelling the fast paths must see through (leading,
trailing, repeated and Unicode whitespace, texts shorter than a key window, words longer than it, nulls).
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from prefloop.datasets_spec import PREFERENCES, conform, make_drops
from prefloop.tasks.common.arrow import as_array, as_mask
from prefloop.tasks.common.text import normalise_whitespace
from prefloop.tasks.filtering import chain as chain_module
from prefloop.tasks.filtering import decontamination, stage
from prefloop.tasks.filtering.chain import ChainState, whitespace_invariant_key
from prefloop.tasks.filtering.dedup import first_occurrences, splitmix64
from prefloop.tasks.filtering.stage import FilterConfig, apply_filters

WORDS = ["a", "to", "the", "3+4=7", "A:7", "supercalifragilistic", "naïve", "数学", "x" * 9, "Ωmega", "q"]
# Whitespace the normaliser collapses. Not \v: normalise_whitespace treats it as a space only when its
# column has no rarer whitespace (RE2's \s lacks \v), so it is not a property of the row alone.
SPACES = [" ", "  ", "\n", "\t", " \r\n", "\u00a0", "\u2003", "\x1c", "\u3000 "]


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def _respace(rng: np.random.Generator, text: str) -> str:
    """The same words, other whitespace: between words, and sometimes before and after."""
    words = text.split()
    joined = "".join(w + str(rng.choice(SPACES)) for w in words[:-1]) + (words[-1] if words else "")
    ends = rng.integers(0, 4)
    return (str(rng.choice(SPACES)) if ends & 1 else "") + joined + (str(rng.choice(SPACES)) if ends & 2 else "")


def random_pairs(rows: int, seed: int) -> tuple[pa.Table, pa.Array]:
    """Pairs with every defect of the rule filters, and the evaluation prompts some of them copy."""
    rng = np.random.default_rng(seed)
    eval_prompts = [_text(rng, int(rng.integers(1, 14))) for _ in range(40)]
    prompts, chosen, rejected, good, bad = [], [], [], [], []
    for row in range(rows):
        kind = rng.integers(0, 10)
        prompt = _text(rng, int(rng.integers(1, 12)))
        answer, other = _text(rng, int(rng.integers(0, 6))), _text(rng, int(rng.integers(0, 6)))
        if kind == 0:  # chosen == rejected, maybe respaced
            other = _respace(rng, answer) if rng.random() < 0.7 else answer
        elif kind == 1:  # shares both ends with chosen, differs inside
            other = answer.split(" ")[0] + " zz " + answer
        elif kind == 2:  # contaminated: an evaluation prompt, re-cased or with a word more
            prompt = str(rng.choice(eval_prompts))
            prompt = prompt.upper() if rng.random() < 0.3 else prompt + (" extra" if rng.random() < 0.5 else "")
        elif kind in (3, 4) and row:  # a duplicate of an earlier pair, respaced
            earlier = int(rng.integers(0, row))
            prompt, answer, other = (_respace(rng, t) if t is not None and rng.random() < 0.7 else t
                                     for t in (prompts[earlier], chosen[earlier], rejected[earlier]))
        elif kind == 5:
            answer = _respace(rng, answer)
        elif kind == 6 and rng.random() < 0.3:
            answer = None if rng.random() < 0.5 else answer
            other = None if answer is not None else other
        prompts.append(prompt)
        chosen.append(answer)
        rejected.append(other)
        score = float(rng.random())
        good.append(score + float(rng.choice([0.0, 0.01, 0.5, np.nan, np.inf], p=[0.1, 0.1, 0.7, 0.05, 0.05])))
        bad.append(score)
    ids = [f"p{i}" for i in range(rows)]
    table = pa.table({"pair_id": ids, "prompt_id": ids, "prompt": prompts, "chosen": chosen, "rejected": rejected,
                      "score_chosen": good, "score_rejected": bad, "margin": np.subtract(good, bad)})
    return conform(table, PREFERENCES)[0], pa.array(eval_prompts)


# ----------------------------------------------------------------------------------------------
# Oracles: normalise everything, hash everything
# ----------------------------------------------------------------------------------------------
def equal_after_normalising_every_row(pairs: pa.Table, first: str, second: str) -> np.ndarray:
    return as_mask(pc.equal(normalise_whitespace(pairs.column(first)), normalise_whitespace(pairs.column(second))))


def repeats_after_normalising_every_row(pairs: pa.Table, columns, alive: np.ndarray) -> np.ndarray:
    return first_occurrences([normalise_whitespace(pairs.column(c)) for c in columns], alive)


def overlap_hashing_every_ngram(prompts, eval_prompts, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram overlap as first written: every n-gram of every prompt hashed (FNV-1a, SplitMix64)."""
    def word_ids(texts, vocabulary):
        words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)))
        lengths = as_array(pc.fill_null(pc.list_value_length(words), 0)).to_numpy().astype(np.int64)
        encoded = as_array(pc.dictionary_encode(words.flatten()))
        distinct = pc.fill_null(pc.index_in(pc.utf8_lower(encoded.dictionary), value_set=vocabulary), -1)
        ids = as_array(distinct).to_numpy().astype(np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]
        return ids, lengths, words

    def ngram_hashes(ids, lengths):
        count = len(ids) - n + 1
        if count <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        ends = np.cumsum(lengths)
        rows = np.repeat(np.arange(len(lengths)), lengths)[:count]
        valid = np.arange(count) + n <= ends[rows]
        unknown = np.concatenate([[0], np.cumsum(ids < 0)])
        valid &= unknown[n:] - unknown[:count] == 0
        words, hashes = ids.astype(np.uint64), np.zeros(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for offset in range(n):
                hashes ^= words[offset:offset + count]
                hashes *= np.uint64(0x100000001B3)
            return rows[valid], splitmix64(hashes[valid])

    eval_words = as_array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(eval_prompts))))
    vocabulary = pc.unique(eval_words.flatten())
    eval_ids, eval_lengths, _ = word_ids(eval_prompts, vocabulary)
    ids, lengths, words = word_ids(prompts, vocabulary)
    rows, hashes = ngram_hashes(ids, lengths)
    _, eval_hashes = ngram_hashes(eval_ids, eval_lengths)
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


# ----------------------------------------------------------------------------------------------
# The fast paths against the oracles
# ----------------------------------------------------------------------------------------------
def test_the_whitespace_key_is_hand_derived_and_blind_to_whitespace():
    head, tail = whitespace_invariant_key(pa.array(["ab cd", "  ab\n\tcd ", "abcdefghij", None, "", "ab"]))
    assert head[0] == 0x6261 and tail[0] == 0x6364  # "ab" before the first stop byte; "dc", last byte first
    assert (head[1], tail[1]) == (head[0], tail[0])
    assert head[2] == int.from_bytes(b"abcdefgh", "little") and tail[2] == int.from_bytes(b"jihgfedc", "little")
    assert (head[3], tail[3], head[4], tail[4]) == (0, 0, 0, 0)
    assert (head[5], tail[5]) == (0x6261, 0x6162)
    texts = [_text(np.random.default_rng(seed), 6) for seed in range(200)]
    variants = [_respace(np.random.default_rng(seed), text) for seed, text in enumerate(texts)]
    for original, variant in zip(whitespace_invariant_key(pa.array(texts)), whitespace_invariant_key(pa.array(variants)),
                                 strict=True):
        assert (original == variant).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_ignoring_whitespace_matches_normalising_every_row(seed):
    pairs, _ = random_pairs(3000, seed)
    expected = equal_after_normalising_every_row(pairs, "chosen", "rejected")
    got = ChainState(pairs, FilterConfig(), None, None).equal_ignoring_whitespace("chosen", "rejected")
    assert expected.sum() > 300 and (got == expected).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeats_ignoring_whitespace_match_first_occurrences_of_normalised_texts(seed):
    pairs, _ = random_pairs(3000, seed)
    chain = ChainState(pairs, FilterConfig(), None, None)
    chain.codes[np.random.default_rng(seed).random(pairs.num_rows) < 0.2] = 0  # some rows already dropped
    columns = ("prompt", "chosen", "rejected")
    expected = repeats_after_normalising_every_row(pairs, columns, chain.alive)
    assert expected.sum() > 200 and (chain.repeats_ignoring_whitespace(columns) == expected).all()


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_contamination_matches_hashing_every_ngram(n):
    pairs, eval_prompts = random_pairs(3000, n)
    prompts = pairs.column("prompt")
    expected, expected_short = overlap_hashing_every_ngram(prompts, eval_prompts, n)
    overlap, short = decontamination.contamination_overlap(prompts, eval_prompts, n)
    assert (expected > 0).sum() > 100
    assert np.array_equal(overlap, expected) and np.array_equal(short, expected_short)


@pytest.mark.parametrize(("rows_per_thread", "mostly_distinct"), [(500, False), (500, True), (10**9, True)])
def test_contaminated_rows_on_threads_and_without_encoding_match_the_oracle(monkeypatch, rows_per_thread,
                                                                            mostly_distinct):
    # Large inputs take two shortcuts: slices on several threads, and no dictionary encoding of prompts
    # that are nearly all distinct. Forced here on a small input, each must give the same rows.
    pairs, eval_prompts = random_pairs(3000, 11)
    prompts = pairs.column("prompt")
    expected = overlap_hashing_every_ngram(prompts, eval_prompts, 3)[0] >= 0.5
    monkeypatch.setattr(decontamination, "_ROWS_PER_THREAD", rows_per_thread)
    monkeypatch.setattr(pa, "cpu_count", lambda: 3)  # whatever OMP_NUM_THREADS says
    monkeypatch.setattr(decontamination, "_mostly_distinct", lambda prompts: mostly_distinct)
    with_null = pa.chunked_array([prompts.combine_chunks(), pa.array([None], pa.string())])
    got = decontamination.contaminated_rows(with_null, eval_prompts, 3, 0.5)
    assert expected.sum() > 100 and np.array_equal(got, np.append(expected, False))


def test_the_filter_chain_matches_the_slow_chain_row_for_row(monkeypatch):
    # The same stage, once as it is and once with every fast path swapped for its oracle: the same reason
    # for every row, hence the same kept rows and the same drops table, in the same order.
    pairs, eval_prompts = random_pairs(4000, 7)
    config = FilterConfig(min_margin=0.05, max_length_ratio=3.0, decontamination_ngram=3,
                          decontamination_min_overlap=0.5)
    fast = apply_filters(pairs, config, eval_prompts=eval_prompts)

    def slow_contaminated(prompts, evaluation, n, min_overlap):
        return overlap_hashing_every_ngram(prompts, evaluation, n)[0] >= min_overlap

    monkeypatch.setattr(stage, "contaminated_rows", slow_contaminated)
    monkeypatch.setattr(ChainState, "equal_ignoring_whitespace",
                        lambda self, a, b: equal_after_normalising_every_row(self.pairs, a, b))
    monkeypatch.setattr(ChainState, "repeats_ignoring_whitespace",
                        lambda self, columns: repeats_after_normalising_every_row(self.pairs, columns, self.alive))
    monkeypatch.setattr(ChainState, "char_lengths", lambda self, column: as_array(
        pc.utf8_length(self.pairs.column(column))).to_numpy(zero_copy_only=False))
    monkeypatch.setattr(chain_module, "whitespace_invariant_key", None)  # the oracles must not need it
    slow = apply_filters(pairs, config, eval_prompts=eval_prompts)
    assert slow.reasons == fast.reasons
    counts = {reason: fast.reasons.count(reason) for reason in set(fast.reasons) - {None}}
    assert min(counts.get(r, 0) for r in ("nonfinite_score", "chosen_equals_rejected", "tie", "length_ratio",
                                          "contaminated", "duplicate_pair")) > 20, counts
    fast_drops, slow_drops = (make_drops(r.table, *r.dropped(), "preferences") for r in (fast, slow))
    assert fast_drops.equals(slow_drops)
    assert fast.table.filter(pa.array(fast.keep)).equals(slow.table.filter(pa.array(slow.keep)))


def test_character_lengths_count_characters_not_bytes():
    pairs, _ = random_pairs(500, 3)
    ascii_rows = pc.fill_null(pc.string_is_ascii(pairs.column("chosen")), True)
    for table in (pairs, pairs.filter(ascii_rows)):  # a column with multi-byte characters, and one without
        expected = as_array(pc.utf8_length(table.column("chosen"))).to_numpy(zero_copy_only=False)
        assert np.array_equal(ChainState(table, FilterConfig(), None, None).char_lengths("chosen"), expected,
                              equal_nan=True)
    assert pc.any(pc.invert(ascii_rows)).as_py() and pairs.column("chosen").null_count
