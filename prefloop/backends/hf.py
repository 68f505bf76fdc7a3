"""``HFBackend``: the policy backend on Hugging Face transformers, for CPU (the embedded default).

Generation is our own sampling loop rather than ``model.generate``: it takes an explicit
``torch.Generator`` (so a seed fixes the completions without touching global random state), reads
log-probs from the raw logits, cuts stop strings, and drops finished rows from the batch and its KV
cache so a long tail of unfinished rows does not pay for the finished ones.

Tokens, padding and log-prob sums come from :mod:`prefloop.forward`, the one forward module shared
with training, so scoring and training see exactly the same tokens and positions.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop.backends.base import Completion, ContextWindowError, GenerationParams, ProgressCallback
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
        self._eos_id = int(tokenizer.eos_token_id)  # read per sampled token: the tokenizer's getattr is slow

    def close(self) -> None:
        """Nothing to release (the model lives in this process); present so stages close any backend."""

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt as generation sees it (special tokens included)."""
        return [len(ids) for ids in self._encode(prompts, special_tokens=True)]

    def _encode(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        """Token ids of each text, each distinct text encoded once, all in one tokenizer call (the same ids
        as encoding them one by one: a fast tokenizer encodes a list text by text)."""
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return []
        encoded = dict(zip(distinct, self.tokenizer(distinct, add_special_tokens=special_tokens)["input_ids"],
                           strict=True))
        return [encoded[text] for text in texts]

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
        self, prompts: list[str], params: GenerationParams, progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt; the same (prompts, params, batch_size) gives the same output.

        Raises :class:`ContextWindowError` (with the offending prompt indices) when a prompt leaves no
        room for a new token in the context window.
        """
        encoded = self._encode(prompts, special_tokens=True)  # once per prompt, not once per sample
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
        """Σ log π(continuation | prompt) per pair (no eos appended), batched with right padding.

        The tokens are those of ``encode_completion`` (prompt with special tokens, continuation without).
        A pair needs the logits at its continuation's positions only, i.e. one forward pass over its
        sequence without the last token; pairs with the same such input share one row of the batch, so
        scoring several one-token answers to one prompt (a yes/no self-evaluation) costs one row, not two.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} continuations")
        prompt_ids = self._encode(prompts, special_tokens=True)
        sequences = [ids + more for ids, more in zip(prompt_ids, self._encode(continuations, False), strict=True)]
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
            input_ids, attention_mask, _ = pad_right([ids for ids, _ in chunk], [0] * len(chunk), self._pad_id)
            width = input_ids.shape[1]
            owners, sources, targets = [], [], []
            for offset, (_, pairs) in enumerate(chunk):
                for pair in pairs:
                    owners.append(pair)
                    sources.append([offset * width + t - 1 for t in scored[pair]])
                    targets.append([sequences[pair][t] for t in scored[pair]])
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                sums = selected_logprob_sums(logits.reshape(-1, logits.shape[-1]).float(), sources, targets)
            for pair, value in zip(owners, sums.tolist(), strict=True):
                scores[pair] = value
            done += sum(len(pairs) for _, pairs in chunk)
            if progress is not None:
                progress(done, len(prompts))
        return scores

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _left_padded(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, whatever the tokenizer's own padding side."""
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids, attention_mask

    def _generate_batch(
        self, prompts: list[list[int]], params: GenerationParams, generator: torch.Generator
    ) -> list[Completion]:
        """Decode one batch of encoded prompts token by token, retiring rows as they stop."""
        input_ids, attention_mask = self._left_padded(prompts)
        # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        room = [params.max_new_tokens] * len(prompts)
        if self.context_window is not None:
            # A row stops (truncated) where prompt + completion would leave the context window.
            prompt_lengths = attention_mask.sum(dim=-1).tolist()
            room = [min(params.max_new_tokens, self.context_window - length) for length in prompt_lengths]
        rows = [_Row(max_new_tokens=limit) for limit in room]
        active = list(range(len(prompts)))  # batch position -> row index
        cache = transformers.DynamicCache()
        # transformers >= 5.x names the KV-cache argument `cache` (`past_key_values` is deprecated there).
        cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            for _ in range(max(room)):
                logits = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{cache_argument: cache},
                ).logits[:, -1, :].float()
                next_tokens = _choose_tokens(logits, params, generator)
                # Log-probs from the untempered logits: the policy's true probability of the sample.
                next_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, next_tokens[:, None]).squeeze(-1)
                keep = [
                    position
                    for position, (token, logprob) in enumerate(
                        zip(next_tokens.tolist(), next_logprobs.tolist(), strict=True)
                    )
                    if not self._advance(rows[active[position]], token, logprob, params)
                ]
                if not keep:
                    break
                if len(keep) < len(active):
                    keep_index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(keep_index)
                    next_tokens, attention_mask = next_tokens[keep_index], attention_mask[keep_index]
                    position_ids = position_ids[keep_index]
                    active = [active[position] for position in keep]
                input_ids = next_tokens[:, None]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
                position_ids = position_ids[:, -1:] + 1
        return [row.completion for row in rows]  # type: ignore[misc]

    def _advance(self, row: _Row, token: int, logprob: float, params: GenerationParams) -> bool:
        """Append a token to a row; return True (and set ``row.completion``) when the row is finished."""
        if token == self._eos_id:
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
        )
