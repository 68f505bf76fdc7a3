"""Stage ``sample``: n completions per prompt from a policy, with token counts and log-probs.

Generation is batched through the policy backend interface, chosen by ``backend`` (``hf``:
transformers in-process, the CPU default; ``vllm``: a ``vllm serve`` process on a GPU host, see
``prefloop.backends.vllm``); the stage's code is the same for both. Every completion records its
finish reason, so truncated samples are marked rather than silently kept. A prompt that does not fit
the model's context window is not sampled: it is recorded in ``drops`` with the reason
``prompt_exceeds_context_window``. Seeds are explicit: the same policy, prompts and config give the
same samples.

Data-parallel (``sharding``, :mod:`prefloop.sharding`): the prompts are cut into seed blocks of
``max(1, batch_size // n)`` prompts — one batch of the backend each — and every block is sampled with
its own random stream, seeded by :func:`~prefloop.sharding.block_seed` from ``seed`` and the block's first
prompt id. A block's samples therefore depend only on its prompts and the config, never on which shard
(or how many) ran it, so 1 or 3 shards publish the same artifact. (Version 2: version 1 drew every batch
from one stream seeded by ``seed``, so a batch's samples depended on the batches before it.)

Sampled token ids (version 3): each sample keeps the ids the policy sampled (``completion_token_ids``)
and the fingerprint of its tokenizer (:func:`prefloop.forward.tokenizer_fingerprint`), so construct,
the reference stage and training score exactly the sampled sequence rather than the tokenizer's
re-encoding of the text (which differs for a byte-level BPE whenever sampling did not pick the
tokenizer's own merges). They are null where the backend does not report ids (the vLLM client against
vLLM < 0.10.2) or where the ids do not decode to the stored text.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.backends import BackendKind, load_backend
from prefloop.backends.base import GenerationParams
from prefloop.datasets_spec import PROMPTS, SAMPLES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import (
    ShardedStageConfig,
    block_seed,
    blocks,
    model_loading,
    run_sharded,
    sharding_metrics,
)
from prefloop.stage import StageContext, StageOutput
from prefloop.tasks.common.prompts import round_prompts
from prefloop.tasks.registry import stage_spec


class SamplingConfig(ShardedStageConfig):
    split: str = Field("train", description="which prompts to sample for")
    max_prompts: int | None = Field(512, ge=1, description="first N prompts of the split (None = all)")
    n: int = Field(8, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="sequences per forward pass (part of the result's identity); "
                            "a multiple of n keeps every batch full (prompts are sampled in blocks of batch_size // n)")
    seed: int = 0
    backend: BackendKind = Field("hf", description="hf: transformers in-process (CPU); vllm: a vllm serve process "
                                 "at $PREFLOOP_VLLM_URL serving the policy artifact (GPU)")
    round: int = Field(0, ge=0, description="loop round this sampling belongs to (recorded in rows)")
    new_prompts_each_round: bool = Field(
        True, description="round k samples prompts [(k-1)·max_prompts, k·max_prompts) of the split (wrapping around), "
        "so rounds see fresh prompts; False: every round samples the first max_prompts",
    )


SPEC = stage_spec(
    "sample",
    version="3",
    config_model=SamplingConfig,
    output_table=SAMPLES,
    description="Sample n completions per prompt from the policy.",
)


SAMPLE_COLUMNS = {"sample_id": pa.string(), "prompt_id": pa.string(), "prompt": pa.string(),
                  "completion": pa.string(), "sample_index": pa.int64(), "completion_tokens": pa.int64(),
                  "sum_logprob": pa.float64(), "finish_reason": pa.string(),
                  "completion_token_ids": pa.list_(pa.int32()), "tokenizer_fingerprint": pa.string()}


def prompts_per_block(batch_size: int, n: int) -> int:
    """Prompts per seed block: as many as fill one batch of ``batch_size`` sequences (at least one)."""
    return max(1, batch_size // n)


def compute(ctx: StageContext) -> StageOutput:
    config: SamplingConfig = ctx.config
    prompts = round_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts, config.round,
                            config.new_prompts_each_round)
    parts = [prompts.slice(run.start, len(run)) for run in blocks(prompts.num_rows, prompts_per_block(
        config.batch_size, config.n))]
    results, shards = run_sharded(ctx, config.sharding, parts, sample_blocks,
                                  units=[part.num_rows * config.n for part in parts], description="sequences")
    drops = pa.concat_tables([drop for _, drop in results]) if results else \
        make_drops(prompts, np.array([], dtype=np.int64), [], "prompts")
    if prompts.num_rows and drops.num_rows == prompts.num_rows:
        raise UserError(f"every one of the {prompts.num_rows} prompts is longer than the policy's context window "
                        f"({drops.column('detail')[0].as_py()}): nothing can be sampled; use shorter prompts or a "
                        "model with a longer max_position_embeddings")
    table = pa.concat_tables([part for part, _ in results] or [pa.table(
        {name: pa.array([], dtype) for name, dtype in SAMPLE_COLUMNS.items()})]).combine_chunks()
    n_rows = table.num_rows
    for column, value, dtype in (("policy_model_id", ctx.inputs["policy"].id, pa.string()),
                                 ("round", config.round, pa.int32()), ("temperature", config.temperature, pa.float64()),
                                 ("top_p", config.top_p, pa.float64()), ("seed", config.seed, pa.int64())):
        table = table.append_column(column, pa.array([value] * n_rows, dtype))
    finish = table.column("finish_reason").to_pylist()
    tokens = table.column("completion_tokens").to_pylist()
    metrics = {
        "prompts": prompts.num_rows,
        "samples": n_rows,
        "truncated": sum(1 for r in finish if r == "length"),
        "empty": sum(1 for text in table.column("completion").to_pylist() if not text),
        "prompts_beyond_context": drops.num_rows,
        "mean_completion_tokens": (sum(tokens) / n_rows) if n_rows else 0.0,
        "samples_with_token_ids": n_rows - table.column("completion_token_ids").null_count,
        **sharding_metrics(config.sharding, shards),
    }
    return StageOutput(table=table, drops=drops, metrics=metrics)


def sample_blocks(ctx: StageContext, parts: list[pa.Table], advance) -> list[tuple[pa.Table, pa.Table]]:
    """One shard: (samples, drops) of each seed block, each block from its own random stream."""
    config: SamplingConfig = ctx.config
    with model_loading():
        backend = load_backend(config.backend, ctx.model_dir("policy"), ctx.inputs["policy"].id, config.batch_size)
    # Imported here: reading a loop config loads this module, and must not load the forward machinery.
    from prefloop.forward import tokenizer_fingerprint

    results = []
    tokenizer = getattr(backend, "tokenizer", None)
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    try:
        for part in parts:
            kept, drops = _drop_prompts_beyond_context(backend, part)
            texts = kept.column("prompt").to_pylist()
            params = GenerationParams(n=config.n, temperature=config.temperature, top_p=config.top_p,
                                      max_new_tokens=config.max_new_tokens,
                                      seed=block_seed(config.seed, part.column("prompt_id")[0].as_py()))
            completions = backend.generate(texts, params) if texts else []
            results.append((_sample_rows(ctx.output_id, kept.column("prompt_id").to_pylist(), texts, completions,
                                         tokenizer, fingerprint), drops))
            advance(part.num_rows * config.n)
    finally:
        backend.close()  # a vLLM server this stage started is stopped; HF: nothing to do
    return results


def sampled_ids(completion, tokenizer, fingerprint: str | None) -> tuple[list[int] | None, str | None]:
    """(ids, tokenizer fingerprint) to store for a completion, or (None, None) when there are no trustworthy ids
    (:func:`prefloop.forward.generated_ids`)."""
    from prefloop.forward import generated_ids

    if tokenizer is None or fingerprint is None:
        return None, None
    ids = generated_ids(completion, tokenizer)
    return (ids, fingerprint) if ids is not None else (None, None)


def _sample_rows(output_id: str, prompt_ids: list[str], texts: list[str], completions, tokenizer=None,
                 fingerprint: str | None = None) -> pa.Table:
    rows: dict[str, list] = {name: [] for name in SAMPLE_COLUMNS}
    for prompt_id, prompt, group in zip(prompt_ids, texts, completions, strict=True):
        for index, completion in enumerate(group):
            rows["sample_id"].append(content_id(output_id, prompt_id, index))
            rows["prompt_id"].append(prompt_id)
            rows["prompt"].append(prompt)
            rows["completion"].append(completion.text)
            rows["sample_index"].append(index)
            rows["completion_tokens"].append(completion.num_tokens)
            rows["sum_logprob"].append(completion.sum_logprob)
            rows["finish_reason"].append(completion.finish_reason)
            ids, ids_fingerprint = sampled_ids(completion, tokenizer, fingerprint)
            rows["completion_token_ids"].append(ids)
            rows["tokenizer_fingerprint"].append(ids_fingerprint)
    return pa.table({name: pa.array(values, SAMPLE_COLUMNS[name]) for name, values in rows.items()})


def _drop_prompts_beyond_context(backend, prompts: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Prompts that leave room for at least one new token, and a drops table for the others."""
    window = getattr(backend, "context_window", None)
    if window is None:
        return prompts, make_drops(prompts, np.array([], dtype=np.int64), [], "prompts")
    lengths = np.array(backend.prompt_lengths(prompts.column("prompt").to_pylist()), dtype=np.int64)
    too_long = np.flatnonzero(lengths >= window)
    drops = make_drops(prompts, too_long, ["prompt_exceeds_context_window"] * len(too_long), "prompts",
                       detail=f"sample stage: the policy's context window is {window} tokens")
    if len(too_long) == 0:
        return prompts, drops
    return prompts.filter(pa.array(lengths < window)), drops
