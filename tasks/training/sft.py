"""Stage ``sft``: the supervised warm start of the loop.

Two starting points, one recipe (:func:`prefloop.tasks.training.recipes.sft.train_sft`):

* the embedded default (no ``policy`` input): a tiny Llama built from ``model`` (no hub download)
  with the locally built character tokenizer, trained on the gold solutions of the ``prompts``;
* a user's model (``policy`` input, e.g. an imported ``prefloop import model DIR``): fine-tuned as it
  is, with its own tokenizer, on ``demonstrations`` — the chosen responses of a preferences artifact —
  or ``demonstration_samples`` — the completions of a samples artifact (the ``prompts``' gold
  solutions are used too when that input is given).

Demonstrations that carry the ids their policy sampled (``chosen_token_ids`` of pairs,
``completion_token_ids`` of samples) are trained on those ids when the model's tokenizer is the one
that sampled them (version 2; :func:`prefloop.forward.sampled_completion_ids`), else on their text.

Checkpoints go to the store so a killed run resumes (see ``tasks/training/artifacts.py``);
``training.distributed.processes`` trains data-parallel (``tasks/training/distributed.py``). The
output is a model artifact: safetensors weights, config and tokenizer files.
"""

from __future__ import annotations

import pyarrow.compute as pc
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, PROMPTS, SAMPLES, TRAIN_LOG
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.errors import UserError
from prefloop.stage import StageContext, StageInputError, StageOutput, done_total_callback
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import (
    StoreCheckpointer,
    clear_checkpoints,
    load_policy,
    save_model_dir,
    summarize,
    train_log_table,
    training_device,
)
from prefloop.tasks.training.configs import SFTConfig, TrainingStageConfig
from prefloop.tasks.training.distributed import run_info, train_with


class SFTStageConfig(TrainingStageConfig):
    model: TinyLlamaConfig = Field(default_factory=TinyLlamaConfig,
                                   description="the embedded model's shape (unused when a policy input is given)")
    training: SFTConfig = Field(default_factory=SFTConfig)
    split: str = Field("train", description="split of the prompts whose gold solutions are trained on")
    seed: int = Field(0, description="model initialisation seed")


SPEC = stage_spec(
    "sft",
    version="2",
    config_model=SFTStageConfig,
    after_publish=clear_checkpoints,
    description="Build the embedded tiny Llama (or take the policy input) and train it on gold solutions or "
    "demonstrations.",
)


def _gold_solutions(ctx: StageContext, split: str) -> list[tuple[str, str]]:
    prompts = ctx.read("prompts", PROMPTS)
    prompts = prompts.filter(pc.equal(prompts.column("split"), split))
    if "reference_solution" not in prompts.column_names or prompts.num_rows == 0:
        raise UserError(f"sft needs prompts with a 'reference_solution' in split '{split}'")
    return [(p, s) for p, s in zip(prompts.column("prompt").to_pylist(),
                                   prompts.column("reference_solution").to_pylist(), strict=True) if s]


Demonstration = tuple[str, str, list[int] | None, str | None]
"""(prompt, response, the response's sampled ids or None, the fingerprint of the tokenizer they belong to)."""


def _demonstrations(ctx: StageContext) -> list[Demonstration]:
    """Chosen responses of ``demonstrations`` and completions of ``demonstration_samples``, with their sampled
    ids where the table has them."""
    examples: list[Demonstration] = []
    for role, table_spec, column, ids_column in (("demonstrations", PREFERENCES, "chosen", "chosen_token_ids"),
                                                 ("demonstration_samples", SAMPLES, "completion",
                                                  "completion_token_ids")):
        if ctx.has(role):
            table = ctx.read(role, table_spec)
            examples += [row for row in zip(table.column("prompt").to_pylist(), table.column(column).to_pylist(),
                                            table.column(ids_column).to_pylist(),
                                            table.column("tokenizer_fingerprint").to_pylist(), strict=True)
                         if row[0] and row[1]]
    return examples


def _examples(ctx: StageContext, config: SFTStageConfig) -> list[Demonstration]:
    if not ctx.has("policy"):
        if ctx.has("demonstrations") or ctx.has("demonstration_samples") or not ctx.has("prompts"):
            raise StageInputError("sft without a policy input trains the embedded model on the prompts' gold "
                                  "solutions: pass --input prompts=REF (demonstrations need --input policy=MODEL)")
        return [(p, s, None, None) for p, s in _gold_solutions(ctx, config.split)]
    examples = _demonstrations(ctx) + ([(p, s, None, None) for p, s in _gold_solutions(ctx, config.split)]
                                       if ctx.has("prompts") else [])
    if not examples:
        raise StageInputError("sft on a policy input needs something to imitate: --input demonstrations=PREFERENCES "
                              "(their chosen responses), --input demonstration_samples=SAMPLES, or prompts with "
                              "reference solutions; the ones given hold no (prompt, response) pair")
    return examples


def compute(ctx: StageContext) -> StageOutput:
    from prefloop.forward import sampled_completion_ids
    from prefloop.tasks.training.recipes.sft import train_sft

    config: SFTStageConfig = ctx.config
    demonstrations = _examples(ctx, config)
    examples = [(prompt, response) for prompt, response, _, _ in demonstrations]
    if ctx.has("policy"):
        model, tokenizer = load_policy(ctx.model_dir("policy"))
        model = model.to(training_device())
    else:
        tokenizer = build_tokenizer()
        model = build_model(config.model, len(tokenizer), config.seed, tokenizer).to(training_device())
    completion_ids = sampled_completion_ids(tokenizer, [ids for _, _, ids, _ in demonstrations],
                                            [fingerprint for _, _, _, fingerprint in demonstrations])
    total = config.training.max_steps or 0
    checkpointer = StoreCheckpointer(ctx.store, ctx.output_id, SPEC.name, SPEC.version)
    with ctx.progress(total, "steps") as advance:
        steps = train_with(train_sft, model, tokenizer, examples, config.training,
                           distributed=config.training.distributed, progress=done_total_callback(advance),
                           checkpointer=checkpointer, completion_ids=completion_ids)
    out = save_model_dir(model, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    output = StageOutput(files_dir=out, extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)},
                         metrics={"examples": len(examples), "parameters": parameters,
                                  "completions_from_sampled_ids": sum(ids is not None for ids in completion_ids),
                                  **summarize(steps),
                                  **run_info(config.training.distributed)})
    if checkpointer.resumed_from is not None:
        output.metrics["resumed_from_step"] = checkpointer.resumed_from
    return output
