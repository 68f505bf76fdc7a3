"""Stage ``sft``: the supervised warm start — a tiny Llama trained on the prompts' gold solutions.

The model is built from a config (no hub download), with the locally built character tokenizer,
and trained with the SFT recipe (:func:`prefloop.tasks.training.recipes.sft.train_sft`), with
checkpoints in the store so a killed run resumes (see ``tasks/training/artifacts.py``).
The output is a model artifact: safetensors weights, config and tokenizer files.
"""

from __future__ import annotations

import pyarrow.compute as pc
from pydantic import Field

from prefloop.datasets_spec import PROMPTS, TRAIN_LOG
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.stage import StageConfig, StageContext, StageOutput, done_total_callback
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import (
    StoreCheckpointer,
    clear_checkpoints,
    save_model_dir,
    summarize,
    train_log_table,
    training_device,
)
from prefloop.tasks.training.configs import SFTConfig


class SFTStageConfig(StageConfig):
    model: TinyLlamaConfig = Field(default_factory=TinyLlamaConfig)
    training: SFTConfig = Field(default_factory=SFTConfig)
    split: str = "train"
    seed: int = Field(0, description="model initialisation seed")


SPEC = stage_spec(
    "sft",
    version="1",
    config_model=SFTStageConfig,
    after_publish=clear_checkpoints,
    description="Build the embedded tiny Llama and train it on the gold solutions of the prompts.",
)


def compute(ctx: StageContext) -> StageOutput:
    from prefloop.tasks.training.recipes.sft import train_sft

    config: SFTStageConfig = ctx.config
    prompts = ctx.read("prompts", PROMPTS)
    prompts = prompts.filter(pc.equal(prompts.column("split"), config.split))
    if "reference_solution" not in prompts.column_names or prompts.num_rows == 0:
        raise ValueError(f"sft needs prompts with a 'reference_solution' in split '{config.split}'")
    examples = [(p, s) for p, s in zip(prompts.column("prompt").to_pylist(),
                                       prompts.column("reference_solution").to_pylist(), strict=True) if s]
    tokenizer = build_tokenizer()
    model = build_model(config.model, len(tokenizer), config.seed, tokenizer).to(training_device())
    total = config.training.max_steps or 0
    checkpointer = StoreCheckpointer(ctx.store, ctx.output_id, SPEC.name, SPEC.version)
    with ctx.progress(total, "steps") as advance:
        steps = train_sft(model, tokenizer, examples, config.training, progress=done_total_callback(advance),
                          checkpointer=checkpointer)
    out = save_model_dir(model, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    output = StageOutput(files_dir=out, extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)},
                         metrics={"examples": len(examples), "parameters": parameters, **summarize(steps)})
    if checkpointer.resumed_from is not None:
        output.metrics["resumed_from_step"] = checkpointer.resumed_from
    return output
