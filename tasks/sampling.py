"""Stage ``sample``: n completions per prompt from a policy, with token counts and log-probs.

Generation is batched through the policy backend interface, chosen by ``backend`` (``hf``:
transformers in-process, the CPU default; ``vllm``: a ``vllm serve`` process on a GPU host, see
``prefloop.backends.vllm``); the stage's code is the same for both. Every completion records its
finish reason, so truncated samples are marked rather than silently kept. A prompt that does not fit
the model's context window is not sampled: it is recorded in ``drops`` with the reason
``prompt_exceeds_context_window``. Seeds are explicit: the same policy, prompts and config give the
same samples.
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
from prefloop.stage import StageConfig, StageContext, StageOutput, done_total_callback
from prefloop.tasks.common.prompts import round_prompts
from prefloop.tasks.registry import stage_spec


class SamplingConfig(StageConfig):
    split: str = Field("train", description="which prompts to sample for")
    max_prompts: int | None = Field(512, ge=1, description="first N prompts of the split (None = all)")
    n: int = Field(8, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="sequences per forward pass (part of the result's identity)")
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
    version="1",
    config_model=SamplingConfig,
    output_table=SAMPLES,
    description="Sample n completions per prompt from the policy.",
)


def compute(ctx: StageContext) -> StageOutput:
    config: SamplingConfig = ctx.config
    prompts = round_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts, config.round,
                            config.new_prompts_each_round)
    backend = load_backend(config.backend, ctx.model_dir("policy"), ctx.inputs["policy"].id, config.batch_size)
    params = GenerationParams(n=config.n, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, seed=config.seed)
    try:
        prompts, drops = _drop_prompts_beyond_context(backend, prompts)
        texts = prompts.column("prompt").to_pylist()
        with ctx.progress(len(texts) * config.n, "sequences") as advance:
            completions = backend.generate(texts, params, progress=done_total_callback(advance))
    finally:
        backend.close()  # a vLLM server this stage started is stopped; HF: nothing to do
    policy_id = ctx.inputs["policy"].id
    rows: dict[str, list] = {k: [] for k in ("sample_id", "prompt_id", "prompt", "completion", "sample_index",
                                              "completion_tokens", "sum_logprob", "finish_reason")}
    for prompt_id, prompt, group in zip(prompts.column("prompt_id").to_pylist(), texts, completions, strict=True):
        for index, completion in enumerate(group):
            rows["sample_id"].append(content_id(ctx.output_id, prompt_id, index))
            rows["prompt_id"].append(prompt_id)
            rows["prompt"].append(prompt)
            rows["completion"].append(completion.text)
            rows["sample_index"].append(index)
            rows["completion_tokens"].append(completion.num_tokens)
            rows["sum_logprob"].append(completion.sum_logprob)
            rows["finish_reason"].append(completion.finish_reason)
    n_rows = len(rows["sample_id"])
    table = pa.table(rows)
    for column, value, dtype in (("policy_model_id", policy_id, pa.string()), ("round", config.round, pa.int32()),
                                 ("temperature", config.temperature, pa.float64()), ("top_p", config.top_p, pa.float64()),
                                 ("seed", config.seed, pa.int64())):
        table = table.append_column(column, pa.array([value] * n_rows, dtype))
    truncated = sum(1 for r in rows["finish_reason"] if r == "length")
    metrics = {
        "prompts": prompts.num_rows,
        "samples": n_rows,
        "truncated": truncated,
        "empty": sum(1 for text in rows["completion"] if not text),
        "prompts_beyond_context": drops.num_rows,
        "mean_completion_tokens": (sum(rows["completion_tokens"]) / n_rows) if n_rows else 0.0,
    }
    return StageOutput(table=table, drops=drops, metrics=metrics)


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
    if len(too_long) == prompts.num_rows:
        raise UserError(f"every one of the {prompts.num_rows} prompts is longer than the policy's context window "
                         f"of {window} tokens: nothing can be sampled; use shorter prompts or a model with a "
                         "longer max_position_embeddings")
    return prompts.filter(pa.array(lengths < window)), drops
