"""Estimators of evaluation metrics, each a pure function with its standard error.

- :func:`mean_with_stderr`: x̄ and s/√n (s with n − 1 in the denominator);
- :func:`accuracy_with_stderr`: p = c/n and the binomial sqrt(p(1 − p)/n);
- :func:`pass_at_k` / :func:`mean_pass_at_k`: the unbiased pass@k = 1 − C(n − c, k)/C(n, k) of
  Chen et al. (2021), per prompt and averaged over prompts;
- :class:`WinRate` / :func:`win_rate`: wins, ties and losses on shared prompts, each rate
  p = count/n with sqrt(p(1 − p)/n);
- :func:`kl_estimate`: KL(π ‖ π_ref) ≈ mean of log π(y|x) − log π_ref(y|x) over samples y ~ π,
  with the standard error over prompts;
- :func:`paired_gain`: mean of d_i = correct_i − baseline_i with the paired error std(d)/√n;
- :func:`group_means`: the mean of the values of each group.

Only numpy: no model, no stage (the evaluate stage and the benchmarks use these).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from prefloop.errors import UserError


def mean_with_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Sample mean x̄ and its standard error s/√n (s with n − 1 in the denominator; None for n < 2)."""
    if len(values) == 0:
        return float("nan"), None
    array = np.asarray(values, dtype=float)
    stderr = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), stderr


def accuracy_with_stderr(correct: Sequence[bool]) -> tuple[float, float]:
    """Accuracy p = c/n and its binomial standard error sqrt(p(1 − p)/n)."""
    n = len(correct)
    if n == 0:
        raise UserError("accuracy of zero prompts is undefined: the evaluation selected no prompts")
    p = sum(bool(c) for c in correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples of which c are correct (Chen et al., 2021):

        pass@k = 1 − C(n − c, k) / C(n, k)

    the probability that at least one of k samples drawn without replacement from the n is correct.
    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> tuple[float, float | None]:
    """Mean over prompts of ``pass_at_k(n_i, c_i, k)``, with the standard error over prompts."""
    return mean_with_stderr([pass_at_k(n, c, k) for n, c in counts])


@dataclass(frozen=True)
class WinRate:
    """Outcome counts of a head-to-head comparison on shared prompts; ties are counted apart."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self, outcome: Literal["wins", "ties", "losses"]) -> tuple[float, float]:
        """Rate p = count/n of one outcome and its standard error sqrt(p(1 − p)/n)."""
        if self.n == 0:
            return float("nan"), float("nan")
        p = getattr(self, outcome) / self.n
        return p, math.sqrt(p * (1 - p) / self.n)


def win_rate(scores: Mapping[str, float], other_scores: Mapping[str, float]) -> WinRate:
    """Wins, ties and losses of ``scores`` against ``other_scores`` on the prompts both scored.

    On prompt i: a win when s_i > o_i, a loss when s_i < o_i, a tie when s_i = o_i. With the verifier
    as judge s ∈ {0, 1} (correct beats wrong; both right or both wrong is a tie); with a reward model
    s is the reward. win_rate = wins/n, tie_rate = ties/n, loss_rate = losses/n over the n shared prompts.
    """
    wins = ties = losses = 0
    for prompt_id in set(scores) & set(other_scores):
        difference = scores[prompt_id] - other_scores[prompt_id]
        if difference > 0:
            wins += 1
        elif difference < 0:
            losses += 1
        else:
            ties += 1
    return WinRate(wins, ties, losses)


def kl_estimate(policy_logprobs: Sequence[float], reference_logprobs: Sequence[float],
                prompt_ids: Sequence[str]) -> tuple[float, float | None]:
    """Monte-Carlo estimate of the sequence-level KL(π ‖ π_ref) and its standard error.

    With samples y_ij ~ π(·|x_i) (j = 1..m per prompt i), the log-ratio
    r_ij = log π(y_ij|x_i) − log π_ref(y_ij|x_i) is an unbiased estimate of KL(π(·|x_i) ‖ π_ref(·|x_i)),
    so KL ≈ (1/N) Σ_ij r_ij (the "k1" estimator; it can be slightly negative on a finite sample).
    Samples of one prompt are not independent of each other as estimates of the average over
    prompts, so the standard error is taken over prompts: std_i(r̄_i)/√P, with r̄_i the mean
    log-ratio of prompt i and P prompts.
    """
    if not len(policy_logprobs) == len(reference_logprobs) == len(prompt_ids):
        raise ValueError("kl_estimate needs one policy and one reference log-prob per sample, and a prompt id each")
    ratios = np.asarray(policy_logprobs, dtype=float) - np.asarray(reference_logprobs, dtype=float)
    per_prompt = group_means(ratios, prompt_ids)
    _, stderr = mean_with_stderr(list(per_prompt.values()))
    return (float(ratios.mean()) if len(ratios) else float("nan")), stderr


def paired_gain(correct: dict[str, bool], baseline: dict[str, bool]) -> tuple[float, float, int]:
    """Mean and standard error of d = correct − baseline over the prompts both evaluated."""
    shared = sorted(set(correct) & set(baseline))
    if not shared:
        return float("nan"), float("nan"), 0
    d = np.array([float(correct[p]) - float(baseline[p]) for p in shared])
    stderr = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), stderr, len(d)


def group_means(values: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """Per group g: (1/|g|) Σ_{i ∈ g} values_i, the groups in order of first appearance."""
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for value, group in zip(values.tolist(), groups, strict=True):
        sums[group] = sums.get(group, 0.0) + value
        counts[group] += 1
    return {group: sums[group] / counts[group] for group in sums}
