"""``HFBackend``: the policy backend on Hugging Face transformers, for CPU (the embedded default).

Generation is our own sampling loop rather than ``model.generate``: it takes an explicit
``torch.Generator`` (so a seed fixes the completions without touching global random state), reads
log-probs from the raw logits, cuts stop strings, and drops finished rows from the batch and its KV
cache so a long tail of unfinished rows does not pay for the finished ones.

Three things keep a step cheap (issue 19): the KV cache of all layers is one preallocated tensor written
in place (:class:`_KVBuffer`; the stock ``DynamicCache`` concatenates every layer's keys and values at
every token, a quadratic copy that took a fifth of a batch's time); identical prompts of a batch (the
``n`` samples of a prompt) are prefilled once and their cache rows copied; finished rows are compacted
away in bulk (a dead row costs a little compute per step, a compaction a copy of the whole cache), never
changing which rows the sampler draws for, so the random stream and the completions stay the same.

Inside ``with backend.prefix_cache(max_bytes)`` (the MCTS search opens one) the backend also keeps the
KV cache of every finished generation row, keyed by its tokens (:class:`_PrefixCache`, LRU bounded by
bytes): a later ``generate`` or ``score_logprobs`` whose input starts with a cached token prefix feeds
only the tokens after it. The KV of a token prefix depends on nothing after it (causal attention, the
positions count real tokens only), so this changes no result beyond float rounding.

Over 400 lines: the generation loop, the in-place KV buffer and the prefix cache share the batch layout
(rows right-aligned, cached tokens left of a common fed block) and are read together.

Tokens, padding and log-prob sums come from :mod:`prefloop.forward`, the one forward module shared
with training, so scoring and training see exactly the same tokens and positions; prompts are encoded
by :mod:`prefloop.chat` (rendered through the tokenizer's chat template when it has one), and
generation stops at eos or the template's end-of-turn token.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefloop.backends.base import Completion, ContextWindowError, GenerationParams, ProgressCallback
from prefloop.chat import encode_continuations, encode_prompts, stop_token_ids
from prefloop.errors import UserError
from prefloop.forward import pad_right, selected_logprob_sums
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = deferred_import("torch")
    transformers = deferred_import("transformers")


COMPACT_FRACTION = 1 / 8
"""Finished rows stay in the batch (fed padding, never sampled) until they are this fraction of it, then all
are dropped in one copy of the cache: below that, computing the dead rows' next column costs less than
copying every live row's cache."""


def _choose_tokens(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, otherwise nucleus sampling at the temperature."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probabilities, sorted_indices = probabilities.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold included).
        mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
        sorted_probabilities[mass_before >= params.top_p] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(-1, sorted_indices, sorted_probabilities)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def _fast_decoder(tokenizer: PreTrainedTokenizerBase):
    """``tokenizer.decode(ids, skip_special_tokens=False)``, straight from the Rust tokenizer where that is
    what the transformers wrapper would do anyway (a fast tokenizer without its own ``_decode`` and with
    no clean-up of tokenization spaces): the wrapper costs ~40 µs a call, and the stop-string check decodes
    every row after every token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        plain = importlib.import_module("transformers.tokenization_utils_tokenizers").TokenizersBackend
    except (ImportError, AttributeError):  # another transformers layout: keep the wrapper
        plain = None
    if (
        backend is not None
        and plain is not None
        and type(tokenizer)._decode is plain._decode
        and type(tokenizer).decode is plain.decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return lambda token_ids: backend.decode(token_ids, skip_special_tokens=False)
    return lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=False)


@dataclass
class _Row:
    """A sequence being generated."""

    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    completion: Completion | None = None


class _KVBuffer:
    """The keys and values of every layer of a batch in one tensor ``[rows, layers, 2, kv heads, capacity,
    head dim]``, written in place, so a decoding step copies only its new column (the stock ``DynamicCache``
    concatenates every layer's keys and values at every token). The first ``rows`` rows are in use; a row's
    cache is one block, so compaction moves rows in place, all layers at once.

    The tensor is a view of storage the backend keeps across batches (``storage(numel, like)``): a fresh
    allocation per batch cost more than a tenth of a batch in page faults. Its unused columns hold zeros or
    keys and values of an earlier batch, finite either way, which is all the attention mask needs (a masked
    column gets weight exactly 0)."""

    def __init__(self, num_layers: int, rows: int, capacity: int, max_rows: int,
                 storage: Callable[[int, torch.Tensor], torch.Tensor]):
        self.num_layers, self.rows, self.capacity, self.max_rows = num_layers, rows, capacity, max_rows
        self.storage = storage
        self.data: torch.Tensor | None = None
        self.length = 0  # columns filled, the same for every layer once a forward pass is through

    def allocate(self, heads: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
        if self.data is None:
            shape = (self.max_rows, self.num_layers, 2, heads, self.capacity, head_dim)
            self.data = self.storage(math.prod(shape), like).view(shape)
        return self.data

    def select_rows(self, rows: list[int]) -> None:
        """Keep these rows, in this order (compaction, or copying a prefilled prompt to its samples)."""
        if self.data is not None:
            blocks = self.data.view(self.max_rows, -1, *self.data.shape[-2:])[:, :, : self.length]
            order = range(len(rows))
            if all(source >= target for target, source in zip(order, rows, strict=True)):
                moves = zip(order, rows, strict=True)  # compaction: each row moves up over rows already moved
            elif all(source <= target for target, source in zip(order, rows, strict=True)):
                moves = zip(reversed(order), reversed(rows), strict=True)  # copies: fill from the end, sources stay intact
            else:
                moves = None
                blocks[: len(rows)] = blocks[torch.tensor(rows, dtype=torch.long)]
            for target, source in moves or ():
                if target != source:
                    blocks[target] = blocks[source]
        self.rows = len(rows)

    def cache(self) -> Any:
        """A transformers ``Cache`` whose layers read and write this buffer."""
        layer_class = _buffer_layer_class()
        return transformers.cache_utils.Cache(layers=[layer_class(self, index) for index in range(self.num_layers)])


@cache
def _buffer_layer_class() -> type:
    """A ``DynamicLayer`` over a :class:`_KVBuffer` (built on first use: transformers is imported lazily)."""

    class BufferLayer(transformers.cache_utils.DynamicLayer):
        def __init__(self, buffer: _KVBuffer, index: int):
            super().__init__()
            self.buffer, self.index, self.filled = buffer, index, buffer.length

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            data = self.buffer.allocate(key_states.shape[1], key_states.shape[3], key_states)
            rows, end = self.buffer.rows, self.filled + key_states.shape[-2]
            data[:rows, self.index, 0, :, self.filled : end] = key_states
            data[:rows, self.index, 1, :, self.filled : end] = value_states
            self.filled = end
            if self.index == self.buffer.num_layers - 1:
                self.buffer.length = end
            self.keys, self.values = data[:rows, self.index, 0, :, :end], data[:rows, self.index, 1, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.filled

        def batch_select_indices(self, indices) -> None:  # rows are selected on the buffer, for all layers at once
            raise NotImplementedError("select rows with _KVBuffer.select_rows")

    return BufferLayer


@dataclass
class _CacheEntry:
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, kv heads, len(tokens), head dim]
    nbytes: int


class _TrieNode:
    __slots__ = ("children", "owners", "ending")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.owners: dict[tuple[int, ...], None] = {}  # entries whose tokens pass through this node
        self.ending: tuple[int, ...] | None = None  # the entry whose tokens end here


class _PrefixCache:
    """KV caches of token sequences, found by their longest shared token prefix (a token trie), bounded by
    ``max_bytes``: the least recently used entries go first. An entry whose tokens a new entry extends is
    dropped (the new one serves its prefix too), so a chain of MCTS steps keeps one entry per leaf."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], _CacheEntry] = OrderedDict()
        self.root = _TrieNode()
        self.nbytes = 0
        self.stats = {"lookups": 0, "tokens_asked": 0, "tokens_reused": 0, "entries_added": 0, "entries_evicted": 0}

    def longest(self, tokens: list[int], limit: int) -> tuple[int, _CacheEntry | None]:
        """The longest prefix of ``tokens`` (at most ``limit`` tokens) some entry holds, and that entry."""
        node, depth = self.root, 0
        while depth < limit and (child := node.children.get(tokens[depth])) is not None:
            node, depth = child, depth + 1
        self.stats["lookups"] += 1
        self.stats["tokens_asked"] += len(tokens)
        if depth == 0:
            return 0, None
        key = next(reversed(node.owners))
        self.entries.move_to_end(key)
        self.stats["tokens_reused"] += depth
        return depth, self.entries[key]

    def add(self, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        nbytes = kv.element_size() * kv.numel()
        if not tokens or nbytes > self.max_bytes:
            return
        node, covered = self.root, []
        for depth, token in enumerate(tokens):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _TrieNode()
            node = child
            if depth + 1 < len(tokens) and node.ending is not None:
                covered.append(node.ending)
        if node.owners:  # an entry already holds these tokens (and maybe more): keep it, refresh it
            self.entries.move_to_end(next(reversed(node.owners)))
            return
        self._insert(_CacheEntry(tokens, kv, nbytes))  # first: removing the covered entries prunes unowned nodes
        for key in covered:
            self._remove(key)
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self.entries)))
            self.stats["entries_evicted"] += 1

    def _insert(self, entry: _CacheEntry) -> None:
        node = self.root
        for token in entry.tokens:
            node = node.children[token]
            node.owners[entry.tokens] = None
        node.ending = entry.tokens
        self.entries[entry.tokens] = entry
        self.nbytes += entry.nbytes
        self.stats["entries_added"] += 1

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        path, node = [], self.root
        for token in key:
            path.append((node, token))
            node = node.children[token]
            del node.owners[key]
        node.ending = None
        for parent, token in reversed(path):  # prune branches no entry passes through any more
            if parent.children[token].owners:
                break
            del parent.children[token]


@dataclass
class _Batch:
    """A batch after its prefill: rows right-aligned to column ``width``, the cache holding every column
    but the fed ones' successors. ``starts[r]`` is the column of row r's first token."""

    buffer: _KVBuffer
    cache: Any
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # the position of each row's last fed token, [rows, 1]
    logits: torch.Tensor  # [rows, fed columns kept, vocab]
    starts: list[int]
    block_start: int  # first fed column


class HFBackend:
    """``PolicyBackend`` on a transformers causal LM, batched, with KV cache, on CPU by default.

    ``context_window`` (the model config's ``max_position_embeddings``) bounds prompt + completion:
    a prompt that does not leave room for one new token raises :class:`ContextWindowError`, and a
    completion that reaches the window finishes with ``length`` (truncated), like ``max_new_tokens``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise UserError("HFBackend needs a tokenizer with pad and eos tokens (set tokenizer.pad_token)")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        window = getattr(model.config, "max_position_embeddings", None)
        self.context_window: int | None = int(window) if window else None
        self._decode_ids = _fast_decoder(tokenizer)
        # Read per sampled token (the tokenizer's getattr is slow); checks the chat template, so a template that
        # raises fails here, when the model is loaded, before a stage writes anything.
        self._stop_ids = stop_token_ids(tokenizer)
        self._num_layers = int(model.config.num_hidden_layers)
        self._prefix_cache: _PrefixCache | None = None
        self._storage: torch.Tensor | None = None  # what the batches' KV buffers are views of (_KVBuffer)
        # transformers >= 5.x names the KV-cache argument `cache` (`past_key_values` is deprecated there).
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def close(self) -> None:
        """Nothing to release (the model lives in this process); present so stages close any backend."""

    def prompt_lengths(self, prompts: list[str], response_prefixes: list[str] | None = None) -> list[int]:
        """Tokens of each prompt as generation sees it (rendered, special tokens included)."""
        return [len(ids) for ids in encode_prompts(self.tokenizer, prompts, response_prefixes)]

    def _encode(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        """Prompts (``special_tokens``: as generation encodes them, :mod:`prefloop.chat`) or continuations."""
        return encode_prompts(self.tokenizer, texts) if special_tokens else encode_continuations(self.tokenizer, texts)

    def _check_context(self, lengths: list[int], what: str, room: int) -> None:
        if self.context_window is None:
            return
        too_long = [index for index, length in enumerate(lengths) if length + room > self.context_window]
        if too_long:
            first = too_long[0]
            raise ContextWindowError(
                f"{len(too_long)} {what} do not fit the model's context window of {self.context_window} tokens "
                f"(the first, #{first}, has {lengths[first]} tokens{' and needs room for one more' if room else ''}): "
                "shorten them, drop them (the sample stage drops such prompts with reason "
                "'prompt_exceeds_context_window'), or use a model with a longer max_position_embeddings",
                too_long,
            )

    @classmethod
    def from_directory(cls, path: str | Path, batch_size: int = 64) -> HFBackend:
        """Load a local model directory (safetensors weights + config + tokenizer); never runs remote code."""
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        return cls(model.eval(), tokenizer, batch_size)

    def generate(
        self, prompts: list[str], params: GenerationParams, progress: ProgressCallback | None = None,
        response_prefixes: list[str] | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt; the same (prompts, params, batch_size) gives the same output.

        ``response_prefixes`` (one per prompt) are answers begun already, continued by the completions
        (an MCTS node's steps): with a chat template they follow the rendered prompt inside the assistant
        turn. Raises :class:`ContextWindowError` (with the offending prompt indices) when a prompt leaves no
        room for a new token in the context window.
        """
        encoded = encode_prompts(self.tokenizer, prompts, response_prefixes)  # once per prompt, not once per sample
        self._check_context([len(ids) for ids in encoded], "prompts", room=1)
        jobs = [ids for ids in encoded for _ in range(params.n)]
        generator = torch.Generator().manual_seed(params.seed)
        flat: list[Completion] = []
        for start in range(0, len(jobs), self.batch_size):
            flat.extend(self._generate_batch(jobs[start : start + self.batch_size], params, generator))
            if progress is not None:
                progress(len(flat), len(jobs))
        return [flat[index : index + params.n] for index in range(0, len(flat), params.n)]

    def score_logprobs(
        self, prompts: list[str], continuations: list[str], progress: ProgressCallback | None = None
    ) -> list[float]:
        """Σ log π(continuation | prompt) per pair (no eos appended), batched.

        The tokens are those of ``encode_completion`` (the prompt as generation encodes it, the continuation
        on its own without special tokens).
        A pair needs the logits at its continuation's positions only, i.e. one forward pass over its
        sequence without the last token; pairs with the same such input share one row of the batch, so
        scoring several one-token answers to one prompt (a yes/no self-evaluation) costs one row, not two.
        Inside :meth:`prefix_cache`, a row whose leading tokens are cached feeds only the rest.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} continuations")
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        sequences = [ids + more for ids, more in zip(prompt_ids, encode_continuations(self.tokenizer, continuations),
                                                     strict=True)]
        starts = [len(ids) for ids in prompt_ids]
        self._check_context([len(sequence) for sequence in sequences], "prompt + continuation pairs", room=0)
        # Token t of a pair's sequence is scored by the logits at t − 1, for its continuation tokens (as in
        # completion_logprobs, a first token with no position before it is not scored; a pair with nothing
        # to score sums to 0 and needs no row).
        scored = [range(max(start, 1), len(sequence)) for start, sequence in zip(starts, sequences, strict=True)]
        rows: dict[tuple[int, ...], list[int]] = {}
        for pair, sequence in enumerate(sequences):
            if scored[pair]:
                rows.setdefault(tuple(sequence[:-1]), []).append(pair)
        inputs = list(rows.items())
        scores = [0.0] * len(prompts)
        done = len(prompts) - sum(len(pairs) for pairs in rows.values())
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            if self._prefix_cache is None:
                input_ids, attention_mask, _ = pad_right([ids for ids, _ in chunk], [0] * len(chunk), self._pad_id)
                width = input_ids.shape[1]
                column = [lambda t: t - 1] * len(chunk)
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            else:
                # The logits a pair needs must come from fed tokens: reuse at most its first scored position.
                limits = [min(scored[pair][0] for pair in pairs) - 1 for _, pairs in chunk]
                batch = self._prefill([list(ids) for ids, _ in chunk], limits, extra_columns=0, all_logits=True)
                logits, width = batch.logits, batch.logits.shape[1]
                column = [lambda t, shift=row_start - batch.block_start: t - 1 + shift for row_start in batch.starts]
            owners, sources, targets = [], [], []
            for offset, (_, pairs) in enumerate(chunk):
                for pair in pairs:
                    owners.append(pair)
                    sources.append([offset * width + column[offset](t) for t in scored[pair]])
                    targets.append([sequences[pair][t] for t in scored[pair]])
            with torch.inference_mode():
                sums = selected_logprob_sums(logits.reshape(-1, logits.shape[-1]).float(), sources, targets)
            for pair, value in zip(owners, sums.tolist(), strict=True):
                scores[pair] = value
            done += sum(len(pairs) for _, pairs in chunk)
            if progress is not None:
                progress(done, len(prompts))
        return scores

    @contextmanager
    def prefix_cache(self, max_bytes: int) -> Iterator[dict[str, int] | None]:
        """Within this scope, reuse the KV cache of token prefixes this backend has generated (module docstring).

        Every generation row that finishes leaves the keys and values of the tokens it fed, up to ``max_bytes``
        in all (least recently used dropped first; 0 turns the cache off); a ``generate`` or ``score_logprobs``
        input that starts with cached tokens feeds only the tokens after them. Yields the cache's counters
        (lookups, tokens asked and reused, entries added and evicted; None when off). The model's weights must
        not change inside the scope: the cache is dropped when it ends.
        """
        previous = self._prefix_cache
        self._prefix_cache = _PrefixCache(max_bytes) if max_bytes > 0 else None
        try:
            yield None if self._prefix_cache is None else self._prefix_cache.stats
        finally:
            self._prefix_cache = previous

    def _kv_storage(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """``numel`` elements of the storage the KV buffers share (grown, zeroed, when a batch needs more)."""
        storage = self._storage
        if storage is None or storage.numel() < numel or storage.dtype != like.dtype or storage.device != like.device:
            storage = self._storage = like.new_zeros(numel)
        return storage[:numel]

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _reusable(self, inputs: list[list[int]], limits: list[int]) -> list[tuple[int, _CacheEntry | None]]:
        """Per input: how many leading tokens the prefix cache holds (at most its limit), and the entry."""
        if self._prefix_cache is None:
            return [(0, None)] * len(inputs)
        found: dict[tuple[tuple[int, ...], int], tuple[int, _CacheEntry | None]] = {}
        for ids, limit in zip(inputs, limits, strict=True):
            key = (tuple(ids), limit)
            if key not in found:
                found[key] = self._prefix_cache.longest(ids, limit)
        return [found[(tuple(ids), limit)] for ids, limit in zip(inputs, limits, strict=True)]

    def _prefill(self, inputs: list[list[int]], limits: list[int], extra_columns: int, all_logits: bool) -> _Batch:
        """Run the inputs' tokens through the model, right-aligned (left padding) into one KV buffer.

        Row r's first u_r tokens come from the prefix cache (u_r ≤ ``limits[r]``); the batch feeds the last
        S = max_r (len_r − u_r) columns, so every row feeds at least its uncached tokens, and a row whose cached
        prefix reaches into that block simply recomputes those tokens. Without a prefix cache S is the longest
        input: plain left padding. Identical inputs are computed once and their rows copied. The buffer keeps
        ``extra_columns`` free columns for decoding; the logits are the last column's, or (``all_logits``)
        the whole fed block's.
        """
        reusable = self._reusable(inputs, limits)
        with torch.inference_mode():  # the buffer is an inference tensor: written in this mode only
            distinct: dict[tuple[int, ...], int] = {}
            copy_of = [distinct.setdefault(tuple(ids), len(distinct)) for ids in inputs]
            rows = list(distinct)
            entries = [None] * len(rows)
            for index, (_, entry) in zip(copy_of, reusable, strict=True):
                entries[index] = entry
            width = max(len(ids) for ids in rows)
            fed = max(len(ids) - used for ids, (used, _) in zip(inputs, reusable, strict=True))
            block_start = width - fed
            starts = [width - len(ids) for ids in rows]
            buffer = _KVBuffer(self._num_layers, len(rows), width + extra_columns, len(inputs), self._kv_storage)
            input_ids = torch.full((len(rows), fed), self._pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (ids, entry) in enumerate(zip(rows, entries, strict=True)):
                attention_mask[row, starts[row] :] = 1
                cached = len(ids) - fed  # tokens left of the fed block: taken from the cache entry
                if cached > 0:
                    assert entry is not None  # cached ≤ the reusable length, which is > 0 only with an entry
                    data = buffer.allocate(entry.kv.shape[2], entry.kv.shape[4], entry.kv)
                    data[row, :, :, :, starts[row] : block_start, :] = entry.kv[:, :, :, :cached, :]
                block = ids[max(cached, 0) :]
                input_ids[row, fed - len(block) :] = torch.tensor(block, dtype=torch.long)
            buffer.length = block_start
            # Positions count real tokens only, so a left-padded row sees the same positions as alone.
            position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, block_start:]
            cache = buffer.cache()
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=0 if all_logits else 1, **{self._cache_argument: cache},
            ).logits
            if len(rows) < len(inputs):  # the n samples of a prompt: copy its prefilled row
                buffer.select_rows(copy_of)
                index = torch.tensor(copy_of, dtype=torch.long)
                attention_mask, position_ids, logits = attention_mask[index], position_ids[index], logits[index]
                starts = [starts[row] for row in copy_of]
        return _Batch(buffer, cache, attention_mask, position_ids[:, -1:], logits, starts, block_start)

    def _generate_batch(
        self, prompts: list[list[int]], params: GenerationParams, generator: torch.Generator
    ) -> list[Completion]:
        """Decode one batch of encoded prompts token by token, retiring rows as they stop."""
        room = [params.max_new_tokens] * len(prompts)
        if self.context_window is not None:
            # A row stops (truncated) where prompt + completion would leave the context window.
            room = [min(params.max_new_tokens, self.context_window - len(ids)) for ids in prompts]
        rows = [_Row(max_new_tokens=limit) for limit in room]
        batch = self._prefill(prompts, [len(ids) - 1 for ids in prompts], max(room), all_logits=False)
        buffer, attention_mask, position_ids = batch.buffer, batch.attention_mask, batch.position_ids
        logits = batch.logits[:, -1, :].float()
        row_of = list(range(len(prompts)))  # batch position -> row index
        live = list(range(len(prompts)))  # batch positions of unfinished rows, in row order
        with torch.inference_mode():
            for _ in range(max(room)):
                # The sampler sees the unfinished rows only, in row order: the same draws whatever the layout.
                if len(live) < len(row_of):
                    logits = logits[torch.tensor(live, dtype=torch.long)]
                next_tokens = _choose_tokens(logits, params, generator)
                # Log-probs from the untempered logits: the policy's true probability of the sample.
                next_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, next_tokens[:, None]).squeeze(-1)
                going = []
                for order, (token, logprob) in enumerate(zip(next_tokens.tolist(), next_logprobs.tolist(), strict=True)):
                    position = live[order]
                    if not self._advance(rows[row_of[position]], token, logprob, params):
                        going.append(order)
                    elif self._prefix_cache is not None:
                        self._remember(prompts[row_of[position]], rows[row_of[position]], buffer, batch.starts[position], position)
                if not going:
                    break
                live = [live[order] for order in going]
                next_tokens = next_tokens[torch.tensor(going, dtype=torch.long)] if len(going) < len(next_tokens) else next_tokens
                if len(row_of) - len(live) >= COMPACT_FRACTION * len(row_of):
                    buffer.select_rows(live)
                    keep = torch.tensor(live, dtype=torch.long)
                    attention_mask, position_ids = attention_mask[keep], position_ids[keep]
                    row_of = [row_of[position] for position in live]
                    batch.starts = [batch.starts[position] for position in live]
                    live = list(range(len(live)))
                if len(live) == len(row_of):
                    input_ids = next_tokens[:, None]
                else:
                    input_ids = torch.full((len(row_of), 1), self._pad_id, dtype=torch.long)
                    input_ids[torch.tensor(live, dtype=torch.long), 0] = next_tokens
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(row_of), 1))], dim=-1)
                position_ids = position_ids + 1
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    **{self._cache_argument: batch.cache},
                ).logits[:, -1, :].float()
        return [row.completion for row in rows]  # type: ignore[misc]

    def _remember(self, prompt: list[int], row: _Row, buffer: _KVBuffer, start: int, position: int) -> None:
        """Put a finished row's fed tokens and their keys and values in the prefix cache. The fed tokens are
        the prompt and every sampled token but the last (it was drawn, never fed)."""
        assert self._prefix_cache is not None and buffer.data is not None
        generated = buffer.length - start - len(prompt)
        tokens = tuple(prompt + row.token_ids[:generated])
        self._prefix_cache.add(tokens, buffer.data[position, :, :, :, start : buffer.length, :].clone())

    def _advance(self, row: _Row, token: int, logprob: float, params: GenerationParams) -> bool:
        """Append a token to a row; return True (and set ``row.completion``) when the row is finished."""
        if token in self._stop_ids:
            row.completion = self._finish(row, len(row.token_ids), None, "stop")
            return True
        row.token_ids.append(token)
        row.token_logprobs.append(logprob)
        if params.stop:
            text = self._decode(row.token_ids)
            cut = min((index for stop in params.stop if (index := text.find(stop)) >= 0), default=-1)
            if cut >= 0:
                row.completion = self._finish(row, self._tokens_within(row.token_ids, cut), text[:cut], "stop")
                return True
        if len(row.token_ids) >= row.max_new_tokens:
            row.completion = self._finish(row, len(row.token_ids), None, "length")
            return True
        return False

    def _tokens_within(self, token_ids: list[int], num_characters: int) -> int:
        """How many leading tokens decode to at most ``num_characters`` characters (stop-string cut)."""
        count = 0
        while count < len(token_ids) and len(self._decode(token_ids[: count + 1])) <= num_characters:
            count += 1
        return count

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_ids(token_ids)

    def _finish(self, row: _Row, num_tokens: int, text: str | None, reason: str) -> Completion:
        kept = row.token_ids[:num_tokens]
        token_logprobs = tuple(row.token_logprobs[:num_tokens])
        return Completion(
            text=self._decode(kept) if text is None else text,
            num_tokens=num_tokens,
            sum_logprob=float(sum(token_logprobs)),
            finish_reason=reason,  # type: ignore[arg-type]
            token_logprobs=token_logprobs,
            token_ids=tuple(kept),
        )
