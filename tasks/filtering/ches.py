"""The policy's view of a pair, for the filter stage: summed completion hidden states, the CHES score
and pair embeddings with their cosine near-duplicate check.

**CHES** ("Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
Razin et al. 2024). With h_{x,y<t} the policy's last hidden state at the position that predicts token t
of y (the eos the trainer appends included),

    CHES(x, y+, y−) = ⟨Σ_t h_{x,y+<t}, Σ_t h_{x,y−<t}⟩ − ‖Σ_t h_{x,y+<t}‖²

(the norm is the *preferred* response's, as in the paper and its reference code); the length-normalised
variant divides each sum by its number of tokens. Pairs with a high score are the ones on which DPO
tends to lower the likelihood of the chosen answer too.

**Embedding** of a pair: the mean last hidden state over chosen and over rejected, concatenated and
scaled to unit length; all pairs are compared (O(n²)), for a round's few thousand pairs.

torch and the tokenisation (``prefloop.forward``) are imported inside :func:`completion_hidden_states`,
so importing this module (the loop config does, through the stage) loads no model code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def completion_hidden_states(model: Any, tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str],
                             rejected: Sequence[str], batch_size: int = 32,
                             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, ...]:
    """Per pair: Σ_t h_{x,y<t} over the positions that predict the tokens of y (eos appended, as the trainer
    does) for y = chosen and y = rejected, and the number of those positions: (sum+, n+, sum−, n−)."""
    import torch

    from prefloop.forward import encode_completion, pad_right

    def summed(texts: Sequence[str], batch_prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [encode_completion(tokenizer, p, t, append_eos=True) for p, t in zip(batch_prompts, texts, strict=True)]
        input_ids, attention_mask, completion_mask = pad_right(
            [ids for ids, _ in encoded], [length for _, length in encoded], int(tokenizer.pad_token_id))
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = output.hidden_states[-1].double()
        # Position t−1 predicts completion token t: shift the completion mask one to the left.
        predicts = torch.zeros_like(completion_mask, dtype=hidden.dtype)
        predicts[:, :-1] = completion_mask[:, 1:]
        return (hidden * predicts.unsqueeze(-1)).sum(dim=1), predicts.sum(dim=1)

    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            parts.append((*summed(chosen[start:end], prompts[start:end]), *summed(rejected[start:end], prompts[start:end])))
            if progress is not None:
                progress(len(parts[-1][1]))
    if not parts:
        return np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)), np.zeros(0)
    return tuple(torch.cat([part[i] for part in parts]).numpy() for i in range(4))


def ches_from_hidden_states(good: np.ndarray, good_tokens: np.ndarray, bad: np.ndarray, bad_tokens: np.ndarray,
                            length_normalised: bool = True) -> np.ndarray:
    """CHES = ⟨Σh+, Σh−⟩ − ‖Σh+‖² per pair (each sum divided by its token count when length-normalised)."""
    if length_normalised:
        good, bad = good / good_tokens[:, None], bad / bad_tokens[:, None]
    return np.einsum("ij,ij->i", good, bad) - np.einsum("ij,ij->i", good, good)


def ches_scores(model: Any, tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                batch_size: int = 32, length_normalised: bool = True,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """CHES(x, y+, y−) per pair from the model's last hidden states, batched (see the module docstring)."""
    states = completion_hidden_states(model, tokenizer, prompts, chosen, rejected, batch_size, progress)
    return ches_from_hidden_states(*states, length_normalised=length_normalised)


def pair_embeddings(good: np.ndarray, good_tokens: np.ndarray, bad: np.ndarray, bad_tokens: np.ndarray) -> np.ndarray:
    """A pair's embedding: the policy's mean hidden state over chosen, then over rejected, concatenated and
    scaled to unit length (so a dot product is the cosine similarity)."""
    if len(good) == 0:
        return np.zeros((0, 0))
    vectors = np.concatenate([good / good_tokens[:, None], bad / bad_tokens[:, None]], axis=1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def similar_to_earlier(embeddings: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """True for each row whose cosine similarity to some earlier row is at least ``threshold``.

    All pairs are compared (O(n²) dot products, in blocks): meant for a round's few thousand pairs.
    """
    rows = len(embeddings)
    similar = np.zeros(rows, dtype=bool)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        scores = embeddings[start:stop] @ embeddings[:stop].T  # this block against itself and every earlier row
        earlier = np.arange(stop)[None, :] < np.arange(start, stop)[:, None]
        similar[start:stop] = ((scores >= threshold) & earlier).any(axis=1)
    return similar
