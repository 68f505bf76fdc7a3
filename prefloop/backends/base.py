"""The policy backend interface: every stage samples and scores through it, in batches.

Two implementations are planned: ``HFBackend`` (transformers, CPU default) and a vLLM backend (GPU).
Stages depend only on this protocol, so swapping the backend never changes a stage's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

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
    stop: list[str] = Field(default_factory=list, description="the text is cut before the first of these")


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    ``sum_logprob`` is the sum of log π(token | prefix) over the tokens of ``text`` under the policy's
    untempered distribution (temperature 1), whatever temperature was used to sample. The terminating
    eos token and the tokens of a matched stop string are not part of ``text`` and not counted, so
    ``sum_logprob`` equals ``score_logprobs([prompt], [text])[0]`` up to float rounding.
    """

    text: str
    num_tokens: int
    sum_logprob: float
    finish_reason: FinishReason


@runtime_checkable
class PolicyBackend(Protocol):
    """What sampling, construction and evaluation need from a policy."""

    def generate(
        self, prompts: list[str], params: GenerationParams, progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order."""
        ...

    def score_logprobs(
        self, prompts: list[str], continuations: list[str], progress: ProgressCallback | None = None
    ) -> list[float]:
        """Sum of log π(continuation | prompt) for each (prompt, continuation) pair, batched."""
        ...
