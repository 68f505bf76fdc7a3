"""The one forward / log-prob module: tokenisation, batching and every sequence log-prob path.

Scoring (``HFBackend.score_logprobs``, evaluation, filtering) and training (the recipes under
``tasks/training/recipes``) read their tokens, positions and log-probs here, so they see exactly the
same numbers. It sits below the backends and the training code and imports neither.

Tokenisation: prompt + completion (+ end of turn), cut to ``max_length`` from the end (keep the
start, as TRL does); the loss covers the completion and its end token only. The prompt goes through
:mod:`prefloop.chat` (the chat template when the tokenizer has one, else the prompt with bos), the
completion is tokenised on its own, with no BPE merge across the prompt/completion boundary; where the
ids sampling produced are known (stored with samples and pairs, :func:`tokenizer_fingerprint` naming
their tokenizer) they replace re-encoding the text, so training and the reference see exactly the
sampled sequence (:func:`sampled_completion_ids`). Right padding needs no attention
mask in the causal paths, since a causal model's real tokens never attend to the pads after them.

Log-prob paths, all Σ log π(y_t | x, y_<t) over completion tokens:

- :func:`completion_logprobs` / :func:`batch_sequence_logprobs`: one padded batch, with its mask;
- :func:`grouped_sequence_logprobs`: rows sorted by length and run in groups padded only to the
  group's longest row (dynamic padding without most of its waste);
- :func:`pair_sequence_logprobs`: chosen and rejected of a pair in one row, their shared prefix once;
- :func:`completion_logps_and_kl` / :func:`logps_and_kl_to_reference`: log-probs and the token-level
  KL to a reference (TDPO);
- :func:`selected_logprob_sums`: sums read from flat logits at given positions.

torch is imported on first use (``prefloop.lazy.deferred_import``).

Over 400 lines: it is the one module where tokens and log-probs are computed for scoring and training
alike; splitting it would give the paths two places to drift apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefloop.chat import encode_continuations, encode_prompts, end_of_turn_id
from prefloop.errors import UserError
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = deferred_import("torch")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's id → token map (its vocabulary, added and special tokens included).

    Sampled token ids (``Completion.token_ids``, stored as ``completion_token_ids`` / ``chosen_token_ids``)
    mean the same tokens to another model only when its tokenizer maps every id to the same token; two
    tokenizers with equal fingerprints do (a model saved and loaded again, the next round's policy, the
    SFT reference of the same family). Normalisation and pre-tokenisation rules are left out: they decide
    how text becomes ids, not what an id is, and stored ids are not text.
    """
    # Kept on the tokenizer (a large vocabulary takes a while to hash, and evaluation asks once per block),
    # keyed by its size: adding tokens changes the map and is seen.
    cached = getattr(tokenizer, "_prefloop_fingerprint", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps(vocabulary, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    fingerprint = "vocab-sha256:" + hashlib.sha256(payload).hexdigest()[:32]
    tokenizer._prefloop_fingerprint = (len(tokenizer), fingerprint)
    return fingerprint


def generated_ids(completion: Any, tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The ids generation produced for ``completion`` (a :class:`prefloop.backends.base.Completion`) when they
    can be trusted, else None: the backend gave none (or not one per counted token), or they do not decode
    to the completion's text (a stop string cut inside a token), so scoring or training on them would use
    other text than the one labeled."""
    ids = list(completion.token_ids)
    if not ids or len(ids) != completion.num_tokens:
        return None
    return ids if tokenizer.decode(ids, skip_special_tokens=False) == completion.text else None


def sampled_completion_ids(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int] | None],
    fingerprints: Sequence[str | None],
) -> list[list[int] | None]:
    """The stored sampled ids a model with ``tokenizer`` may train on: each row's ids where its
    ``tokenizer_fingerprint`` equals this tokenizer's, else None (the text is re-encoded instead).

    Ids are valid only for the tokenizer of the policy that sampled them: fed to a model whose
    vocabulary differs they would be other tokens (or out of range), so a row sampled by another
    tokenizer, or without a fingerprint (imported, written before ids were stored), falls back to
    encoding its text with ``tokenizer`` (:func:`encode_examples`), as before ids were stored.
    """
    if len(token_ids) != len(fingerprints):
        raise ValueError(f"got {len(token_ids)} token id rows but {len(fingerprints)} fingerprints")
    if all(ids is None for ids in token_ids):
        return [None] * len(token_ids)
    own = tokenizer_fingerprint(tokenizer)
    return [list(ids) if ids is not None and fingerprint == own else None
            for ids, fingerprint in zip(token_ids, fingerprints, strict=True)]


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    append_eos: bool,
    completion_ids: Sequence[int] | None = None,
    response_prefix: str = "",
) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ end of turn) and the number of prompt tokens.

    The prompt is encoded by :func:`prefloop.chat.encode_prompts` (rendered through the chat template
    when the tokenizer has one, else with the tokenizer's special tokens), the completion on its own
    without special tokens, exactly as generation put them together; ``append_eos`` appends the token
    generation stops at (:func:`prefloop.chat.end_of_turn_id`: the template's end-of-turn, else eos).
    ``completion_ids`` (the ids generation produced, ``Completion.token_ids``) replace re-encoding the
    text, so a sampled token sequence that is not the tokenizer's own encoding of its text is kept as is.
    """
    prompt_ids = encode_prompts(tokenizer, [prompt], [response_prefix] if response_prefix else None)[0]
    completion_ids = list(completion_ids) if completion_ids is not None else \
        encode_continuations(tokenizer, [completion])[0]
    if append_eos:
        completion_ids = completion_ids + [end_of_turn_id(tokenizer)]
    return prompt_ids + completion_ids, len(prompt_ids)


def pad_right(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on completion tokens).

    Right padding keeps positions 0..L-1 for every real token, as in left-padded generation with
    position ids derived from the attention mask.
    """
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.float32)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        completion_mask[row, prompt_length : len(sequence)] = 1.0
    return input_ids, attention_mask, completion_mask


def completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Σ_t log π(x_t | x_<t) over the completion tokens of each row (shape [batch]).

    Differentiable; wrap in ``torch.no_grad()`` for scoring. The tensors are moved to the model's device
    (``pad_right`` builds them on the CPU; on the CPU the move is a no-op).
    """
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    completion_mask = completion_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    return (token_logprobs * completion_mask[:, 1:]).sum(dim=-1)


def selected_logprob_sums(
    logits: torch.Tensor, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Σ_j log softmax(logits[sources[i][j]])[targets[i][j]] for each i, from flat ``logits`` [N, V].

    Only the rows that predict a scored token are read, and log softmax is taken as
    logit − logsumexp on them, so no float32 copy of the whole [N, V] logits or log-probs is made
    (what dominates memory with a large vocabulary).
    """
    width = max(len(row) for row in sources)
    flat_sources = [0] * (len(sources) * width)
    flat_targets = [0] * (len(sources) * width)
    flat_mask = [0.0] * (len(sources) * width)
    for row, (row_sources, row_targets) in enumerate(zip(sources, targets, strict=True)):
        start = row * width
        flat_sources[start : start + len(row_sources)] = row_sources
        flat_targets[start : start + len(row_targets)] = row_targets
        flat_mask[start : start + len(row_sources)] = [1.0] * len(row_sources)
    shape = (len(sources), width)
    source_index = torch.tensor(flat_sources, dtype=torch.long).view(shape).to(logits.device)
    target_index = torch.tensor(flat_targets, dtype=torch.long).view(shape).to(logits.device)
    mask = torch.tensor(flat_mask, dtype=torch.float32).view(shape).to(logits.device)
    selected = logits[source_index]  # [rows, width, V]
    if selected.dtype in (torch.float16, torch.bfloat16):  # reduced-precision logits: log-probs in float32
        selected = selected.float()
    token_logprobs = selected.gather(-1, target_index[..., None]).squeeze(-1) - selected.logsumexp(dim=-1)
    return (token_logprobs * mask).sum(dim=-1)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + completion + eos and the number of prompt tokens."""

    token_ids: list[int]
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.token_ids) - self.prompt_length


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a batch; ``completion_mask`` is 1 on the tokens that carry loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=-1)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int | None = None,
    response_prefixes: Sequence[str] | None = None,
    completion_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[EncodedExample]:
    """Tokenise (prompt, completion) pairs as :func:`encode_completion` does, in one tokenizer call per
    side; the end token (eos, or the template's end of turn) is appended so the model learns to stop.

    ``completion_ids`` (one entry per completion, None where unknown): the ids sampling produced, used
    instead of re-encoding that completion's text, so the model is trained and scored on exactly the
    sampled sequence (a byte-level BPE re-encodes a sampled sequence to other ids whenever sampling
    did not pick the tokenizer's own merges). Callers pass only ids of this tokenizer
    (:func:`sampled_completion_ids`). With ``max_length`` a longer sequence keeps its first
    ``max_length`` tokens (the cut completion then has no end token); a prompt that leaves no
    completion token at all is an error.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    if completion_ids is not None and len(completion_ids) != len(completions):
        raise ValueError(f"got {len(completion_ids)} completion id rows for {len(completions)} completions")
    end = end_of_turn_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, response_prefixes)
    continuation_ids = _continuation_ids(tokenizer, completions, completion_ids)
    encoded = []
    for index, (ids, more) in enumerate(zip(prompt_ids, continuation_ids, strict=True)):
        token_ids, prompt_length = ids + more + [end], len(ids)
        if max_length is not None and len(token_ids) > max_length:
            if prompt_length >= max_length:
                raise UserError(
                    f"example {index}: its prompt alone has {prompt_length} tokens but max_length is {max_length}, "
                    "so no completion token would be trained: raise max_length or drop such prompts"
                )
            token_ids = token_ids[:max_length]
        encoded.append(EncodedExample(token_ids, prompt_length))
    return encoded


def _continuation_ids(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[str], completion_ids: Sequence[Sequence[int] | None] | None
) -> list[list[int]]:
    """Each completion's given ids, or its text encoded (only the texts without ids go to the tokenizer)."""
    if completion_ids is None:
        return encode_continuations(tokenizer, completions)
    missing = [index for index, ids in enumerate(completion_ids) if ids is None]
    encoded = iter(encode_continuations(tokenizer, [completions[index] for index in missing]))
    return [next(encoded) if ids is None else list(ids) for ids in completion_ids]


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Pad a list of examples to the longest of them (dynamic padding)."""
    return Batch(
        *pad_right([e.token_ids for e in examples], [e.prompt_length for e in examples], pad_id)
    )


def completion_lengths(examples: Sequence[EncodedExample]) -> torch.Tensor:
    """Completion tokens (eos included) of each example, as float32 (the losses divide by them)."""
    return torch.tensor([example.completion_length for example in examples], dtype=torch.float32)


def batch_sequence_logprobs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over the completion tokens of each row, shape [batch] (differentiable)."""
    return completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


# Padded tokens per forward pass when a batch is split into length groups. Smaller groups waste less
# on padding but pay Python and kernel-launch overhead per pass; on the embedded model, 1024 tokens
# for single rows and 512 for prefix-sharing pair rows (32 pairs: 4-6 passes) measured fastest
# (fwd + bwd of one batch, 256 to 1024 within noise of each other; benchmarks/trainer_vs_trl.py
# times whole runs). Packing several short pair rows into one row (first-fit decreasing) saved no
# padding over these groups on the benchmark's data and was slower: one wide row makes attention
# quadratic in its width.
GROUP_TOKENS = 1024
PAIR_GROUP_TOKENS = 512
INFERENCE_GROUP_TOKENS = 8192


def length_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in groups for forward passes: longest first, each group padded to its first row's
    length and holding at most ``max_tokens`` padded tokens (at least one row). Ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    groups: list[list[int]] = []
    width = 0
    for index in order:
        if not groups or (len(groups[-1]) + 1) * width > max_tokens:
            groups.append([])
            width = lengths[index]
        groups[-1].append(index)
    return groups


def _causal_completion_logprobs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Σ log π over the completion tokens of right-padded rows, without an attention mask.

    Under a causal mask a real token only attends to earlier positions, which are all real when the
    padding is on the right; the pads' own outputs carry no loss. Leaving the mask out lets the
    attention kernel take its fast causal path instead of materialising a padding mask.
    """
    input_ids, completion_mask = batch.input_ids.to(model.device), batch.completion_mask.to(model.device)
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * completion_mask[:, 1:]).sum(dim=-1)


def grouped_sequence_logprobs(
    model: PreTrainedModel, examples: Sequence[EncodedExample], pad_id: int, max_tokens: int = GROUP_TOKENS
) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over each example's completion tokens, shape [len(examples)], in the
    examples' order; rows run in length groups (:func:`length_groups`) so little compute goes to pads.
    Differentiable; call under ``torch.inference_mode()`` for scoring."""
    groups = length_groups([len(example.token_ids) for example in examples], max_tokens)
    parts = [_causal_completion_logprobs(model, collate([examples[i] for i in group], pad_id)) for group in groups]
    flat = torch.cat(parts)
    position = torch.empty(len(examples), dtype=torch.long)
    position[torch.tensor([index for group in groups for index in group])] = torch.arange(len(examples))
    return flat[position.to(flat.device)]


@dataclass(frozen=True)
class _PairRow:
    """One preference pair laid out as one row: the prefix both sequences share, then the rest of the
    chosen sequence, then the rest of the rejected one. Only inputs are laid out: a sequence's last
    token is a target but never an input (no later token of its own reads it)."""

    token_ids: list[int]
    position_ids: list[int]
    branch: list[int]  # 0 shared prefix, 1 chosen only, 2 rejected only
    # For each completion token (the target), the row offset whose logits predict it.
    chosen_sources: list[int]
    chosen_targets: list[int]
    rejected_sources: list[int]
    rejected_targets: list[int]


def _pair_row(chosen: EncodedExample, rejected: EncodedExample, index: int) -> _PairRow:
    prompt = chosen.prompt_length
    chosen_ids, rejected_ids = chosen.token_ids, rejected.token_ids
    if rejected.prompt_length != prompt or rejected_ids[:prompt] != chosen_ids[:prompt]:
        raise ValueError(f"pair {index}: chosen and rejected do not share their prompt tokens")
    chosen_inputs, rejected_inputs = len(chosen_ids) - 1, len(rejected_ids) - 1
    shared = min(prompt, chosen_inputs, rejected_inputs)
    limit = min(chosen_inputs, rejected_inputs)
    while shared < limit and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    first_target = max(prompt, 1)  # position 0 has no logits before it
    return _PairRow(
        token_ids=chosen_ids[:chosen_inputs] + rejected_ids[shared:rejected_inputs],
        position_ids=[*range(chosen_inputs), *range(shared, rejected_inputs)],
        branch=[0] * shared + [1] * (chosen_inputs - shared) + [2] * (rejected_inputs - shared),
        chosen_sources=list(range(first_target - 1, chosen_inputs)),
        chosen_targets=chosen_ids[first_target:],
        rejected_sources=[position if position < shared else chosen_inputs + position - shared
                          for position in range(first_target - 1, rejected_inputs)],
        rejected_targets=rejected_ids[first_target:],
    )


def pair_sequence_logprobs(
    model: PreTrainedModel,
    chosen: Sequence[EncodedExample],
    rejected: Sequence[EncodedExample],
    pad_id: int,
    max_tokens: int = PAIR_GROUP_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over the chosen and over the rejected completion of each pair, their shared prefix run once.

    Each pair is one row: the prefix the two sequences share (the prompt and any common start of the
    two completions), then the rest of the chosen sequence, then the rest of the rejected one. The
    rejected tokens take the positions that follow the shared prefix (position ids S, S+1, … like the
    chosen ones) and a 4-D attention mask keeps them from attending to the chosen tokens, so each
    sequence sees exactly its own earlier tokens, as in two separate rows, while the shared tokens are
    computed once (prefix sharing, as in Wang et al. 2024, "Accelerating Direct Preference
    Optimization with Prefix Sharing"). A completion token in the shared prefix has the same
    log-prob in both sequences and counts in both sums. The last token of each sequence is only a
    target and is not fed in. Rows run in length groups (:func:`length_groups`). Differentiable, and
    the same sums as two separate padded rows per pair up to float rounding.
    """
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        # Kernels without arbitrary masks (flash attention): one row per completion instead.
        scores = grouped_sequence_logprobs(model, [*chosen, *rejected], pad_id, 2 * max_tokens)
        return scores[: len(chosen)], scores[len(chosen) :]
    pair_rows = [_pair_row(first, second, index)
                 for index, (first, second) in enumerate(zip(chosen, rejected, strict=True))]
    lengths = [len(row.token_ids) for row in pair_rows]
    groups = length_groups(lengths, max_tokens)
    device = model.device
    parts = []
    for group in groups:
        width = lengths[group[0]]
        # Flat lists, one tensor each: building rows with per-row tensor writes costs more than the pass.
        token_ids, position_ids, branch = [pad_id] * (len(group) * width), [0] * (len(group) * width), \
            [3] * (len(group) * width)  # branch 3: pad
        sources, targets = [], []
        for row, index in enumerate(group):
            pair_row, start = pair_rows[index], row * width
            end = start + lengths[index]
            token_ids[start:end], position_ids[start:end], branch[start:end] = \
                pair_row.token_ids, pair_row.position_ids, pair_row.branch
            sources.append([start + offset for offset in pair_row.chosen_sources])
            targets.append(pair_row.chosen_targets)
        for row, index in enumerate(group):
            pair_row, start = pair_rows[index], row * width
            sources.append([start + offset for offset in pair_row.rejected_sources])
            targets.append(pair_row.rejected_targets)
        shape = (len(group), width)
        input_ids = torch.tensor(token_ids, dtype=torch.long).view(shape).to(device)
        position_ids = torch.tensor(position_ids, dtype=torch.long).view(shape).to(device)
        branches = torch.tensor(branch, dtype=torch.long).view(shape).to(device)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # Pads come last, so causality already hides them from real tokens; pad rows still see earlier
        # tokens, which keeps every softmax row finite.
        attention_mask = (causal & ~((branches[:, :, None] == 2) & (branches[:, None, :] == 1)))[:, None]
        if implementation == "eager":  # eager attention adds the mask to the scores
            blocked = torch.finfo(model.dtype).min
            attention_mask = torch.zeros(attention_mask.shape, dtype=model.dtype, device=device).masked_fill(
                ~attention_mask, blocked)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        sums = selected_logprob_sums(logits.reshape(-1, logits.shape[-1]), sources, targets)
        parts.append(sums.view(2, len(group)))
    position = torch.empty(len(lengths), dtype=torch.long)
    position[torch.tensor([index for group in groups for index in group])] = torch.arange(len(lengths))
    position = position.to(device)
    chosen_sums, rejected_sums = torch.cat(parts, dim=1)
    return chosen_sums[position], rejected_sums[position]


def completion_logps_and_kl(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t log π(y_t | x, y_<t) and Σ_t KL(π_ref(·|x, y_<t) ‖ π(·|x, y_<t)) over the completion tokens.

    Logits are the models' outputs over the whole padded sequence, shape [batch, length, vocab]; the
    logits at position t predict token t + 1, so ``completion_mask`` (1 on completion tokens, shape
    [batch, length]) is shifted by one. The KL term at each position is over the whole vocabulary, as
    TDPO's sequential KL D_SeqKL (Zeng et al. 2024). Both sums are differentiable w.r.t. ``policy_logits``.
    """
    policy_log_probs = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)
    reference_log_probs = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    mask = completion_mask[:, 1:].to(policy_log_probs.dtype)
    token_logps = policy_log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    # kl_div(input=log p, target=log q, log_target=True) = q·(log q − log p): KL(q ‖ p) with q = π_ref.
    token_kl = torch.nn.functional.kl_div(policy_log_probs, reference_log_probs, reduction="none", log_target=True).sum(dim=-1)
    return (token_logps * mask).sum(dim=-1), (token_kl * mask).sum(dim=-1)


def logps_and_kl_to_reference(
    policy: PreTrainedModel, reference: PreTrainedModel, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy sequence log-probs and Σ_t KL(π_ref‖π) over each completion (for TDPO): one forward of each.

    ``collate`` builds the batch on the CPU: each model gets it on its own device, and the results are on
    the policy's (on the CPU every move is a no-op).
    """
    device = policy.device
    input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        reference_logits = reference(input_ids=batch.input_ids.to(reference.device),
                                     attention_mask=batch.attention_mask.to(reference.device)).logits
    return completion_logps_and_kl(logits, reference_logits.to(device), input_ids, batch.completion_mask.to(device))
