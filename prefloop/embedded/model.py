"""The embedded default policy: a tiny Llama built from a config, never downloaded.

Defaults (hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings) give about 1.05 M
parameters with the 24-token character vocabulary; they learn the default arithmetic task on two
CPU cores in about two minutes (see /work/shared/FINDINGS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
else:
    torch = deferred_import("torch")
    transformers = deferred_import("transformers")


class TinyLlamaConfig(BaseModel):
    """Architecture of the embedded Llama."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_position_embeddings: int = Field(128, ge=16, description="prompt + completion tokens")
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    initializer_range: float = 0.02


def build_model(
    config: TinyLlamaConfig, vocab_size: int, seed: int, tokenizer: PreTrainedTokenizerBase
) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM``; the same (config, vocab_size, seed) gives the same weights.

    The tokenizer supplies the pad/bos/eos ids so that ``generate`` and saved configs agree with it.
    """
    llama_config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
        initializer_range=config.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Initialisation draws from the global generator; fork it so building a model does not shift
    # the random stream of the caller.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
