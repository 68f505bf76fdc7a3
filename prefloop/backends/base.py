"""The policy backend interface: every stage samples and scores through it, in batches.

Two implementations: ``HFBackend`` (transformers, in-process, CPU default; ``prefloop.backends.hf``)
and ``VLLMBackend`` (a client of a ``vllm serve`` process on a GPU host, which runs in its own
environment; ``prefloop.backends.vllm``). Stages depend only on this protocol and pick the
implementation by config (``backend: hf|vllm``, see :func:`prefloop.backends.load_backend`), so
swapping the backend never changes a stage's code.

Besides the protocol this module holds what every implementation shares: the generation
parameters, the completion record, the error for prompts that do not fit the context window,
:func:`yes_probability` (self-evaluation scoring built on ``score_logprobs``) and :func:`prefix_cache`
(a scope in which a backend may reuse the KV cache of prompts that extend earlier ones, as a tree
search's do; a backend without such a cache, or with its own, like vLLM's automatic prefix caching,
needs nothing for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from prefloop.errors import UserError

FinishReason = Literal["stop", "length"]
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch, so callers can draw progress bars."""


class GenerationParams(BaseModel):
    """Sampling parameters. Temperature 0 means greedy decoding; the seed makes sampling reproducible."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0
    stop: list[str] = Field(
        default_factory=list,
        description="the text is cut before the first of these (e.g. a newline: one reasoning step); "
        "a completion that hits one finishes with 'stop'",
    )


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    ``sum_logprob`` is the sum of log π(token | prefix) over the tokens of ``text`` under the policy's
    untempered distribution (temperature 1), whatever temperature was used to sample. The terminating
    eos token and the tokens of a matched stop string are not part of ``text`` and not counted, so
    ``sum_logprob`` equals ``score_logprobs([prompt], [text])[0]`` up to float rounding.
    ``token_logprobs`` holds the same log-probs one per token of ``text`` (``num_tokens`` of them,
    summing to ``sum_logprob``); it is empty only for completions built by hand.
    ``finish_reason`` is ``stop`` (eos, the chat template's end-of-turn token or a stop string) or
    ``length`` (``max_new_tokens`` or the model's context window was reached: the text is truncated).
    ``token_ids`` are the sampled ids of ``text`` where the backend knows them (``HFBackend``;
    ``VLLMBackend`` against vLLM >= 0.10.2): training on them
    (``prefloop.forward.encode_completion(..., completion_ids=...)``) sees exactly the sampled sequence
    even where it is not the tokenizer's own encoding of the text. Not compared: two completions with
    the same text and log-probs are equal whichever backend made them.
    """

    text: str
    num_tokens: int
    sum_logprob: float
    finish_reason: FinishReason
    token_logprobs: tuple[float, ...] = ()
    token_ids: tuple[int, ...] = field(default=(), compare=False)


class ContextWindowError(ValueError):
    """Prompts (or prompt + continuation) longer than the model's context window.

    ``indices`` are the positions of the offending inputs, so a caller can drop exactly those rows
    with a named reason instead of failing (the sample stage does: ``prompt_exceeds_context_window``).
    """

    def __init__(self, message: str, indices: Sequence[int]):
        super().__init__(message)
        self.indices = list(indices)


@runtime_checkable
class PolicyBackend(Protocol):
    """What sampling, construction and evaluation need from a policy."""

    def generate(
        self, prompts: list[str], params: GenerationParams, progress: ProgressCallback | None = None,
        response_prefixes: list[str] | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order; a prompt is the user's plain text
        (the backend renders it through the model's chat template, :mod:`prefloop.chat`), and
        ``response_prefixes`` are answers already begun that the completions continue."""
        ...

    def score_logprobs(
        self, prompts: list[str], continuations: list[str], progress: ProgressCallback | None = None
    ) -> list[float]:
        """Sum of log π(continuation | prompt) for each (prompt, continuation) pair, batched."""
        ...


@runtime_checkable
class PrefixCachingBackend(Protocol):
    """A backend that can keep the KV cache of what it computed for later inputs that start with the same
    tokens (``HFBackend``). Results are the same with or without it, up to float rounding."""

    def prefix_cache(self, max_bytes: int) -> AbstractContextManager[Any]:
        """A scope in which the backend reuses cached prefixes, holding at most ``max_bytes`` of them."""
        ...


def prefix_cache(backend: PolicyBackend, max_bytes: int) -> AbstractContextManager[Any]:
    """``backend.prefix_cache(max_bytes)`` where the backend has one, else a scope that does nothing.

    Callers whose prompts extend earlier prompts (the MCTS search: a node's text is its parent's plus one
    step) open it around their calls; the value it yields is the backend's cache counters, or None.
    """
    if isinstance(backend, PrefixCachingBackend):
        return backend.prefix_cache(max_bytes)
    return nullcontext(None)


def yes_probability(
    backend: PolicyBackend, prompts: list[str], yes: str = "yes", no: str | None = "no",
    progress: ProgressCallback | None = None,
) -> list[float]:
    """The policy's probability of answering ``yes`` to each self-evaluation prompt.

    With ``no`` given (the usual case), the two answers are normalised against each other:
    P(yes) = π(yes|x) / (π(yes|x) + π(no|x)) = σ(log π(yes|x) − log π(no|x)), the self-evaluation
    confidence of MCTS-DPO (Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative
    Preference Learning"), robust to mass the model puts on other continuations. With ``no=None`` it
    is the unnormalised π(yes|x) = exp(log π(yes|x)). Both are batched through ``score_logprobs``, so
    every backend supports them. The answer strings must be in the tokenizer's vocabulary.
    """
    if not yes or (no is not None and (not no or no == yes)):
        raise UserError(f"yes_probability needs two different non-empty answers, got yes={yes!r}, no={no!r}")
    if no is None:
        return [math.exp(value) for value in backend.score_logprobs(prompts, [yes] * len(prompts), progress)]
    scores = backend.score_logprobs(prompts + prompts, [yes] * len(prompts) + [no] * len(prompts), progress)
    return [_sigmoid(a - b) for a, b in zip(scores[: len(prompts)], scores[len(prompts):], strict=True)]


def _sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exponential = math.exp(value)
    return exponential / (1.0 + exponential)
