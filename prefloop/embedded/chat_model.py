"""A tiny chat model built locally: byte-level BPE tokenizer with a chat template, and a tiny Llama.

What a user's Hugging Face chat model looks like, at toy scale and without downloads: a byte-level
BPE (as GPT-2, Llama 3 and Qwen use) trained with ``tokenizers`` on generated word-problem text, wrapped
as a ``PreTrainedTokenizerFast`` with bos/eos/pad and the chat markers as special tokens, and a short
Jinja chat template whose assistant turns end with the end-of-turn token ``<|end|>``::

    <bos><|user|>
    PROMPT<|end|>
    <|assistant|>
    ANSWER<|end|>

The model is the embedded ``LlamaForCausalLM`` (:func:`prefloop.embedded.model.build_model`) sized to
the tokenizer's vocabulary. Everything is deterministic for its arguments. Tests use it to check chat
rendering (:mod:`prefloop.chat`); a second embedded default can start from it (save with
:func:`save_chat_model` and import the directory as a user would).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import tokenizers
    import transformers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
else:
    tokenizers = deferred_import("tokenizers")
    transformers = deferred_import("transformers")

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('this template knows user and assistant messages only') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SMALL_CHAT_MODEL = TinyLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=256)

_NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Max", "Zoe")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "eggs", "stamps")


def word_problem_lines(count: int, seed: int = 0) -> list[str]:
    """``count`` lines of short word problems and their worked answers (the BPE's training text)."""
    rng = random.Random(f"prefloop.chat_model/{seed}")
    lines = []
    for _ in range(count):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start, more, less = rng.randint(2, 40), rng.randint(1, 30), rng.randint(1, 9)
        lines.append(f"{name} has {start} {item}. {name} gets {more} more and gives away {less}. "
                     f"How many {item} does {name} have now?")
        lines.append(f"{start}+{more}={start + more}\n{start + more}-{less}={start + more - less}\n"
                     f"A:{start + more - less}")
    return lines


def build_chat_tokenizer(texts: Sequence[str] | None = None, vocab_size: int = 512,
                         chat_template: str | None = CHAT_TEMPLATE, split_digits: bool = False,
                         model_max_length: int = SMALL_CHAT_MODEL.max_position_embeddings) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (default: 400 generated word-problem lines) with pad/bos/eos and
    the chat markers as special tokens, ``chat_template`` set (None: a model without a template), left padding.

    ``split_digits``: every digit is its own token (as Llama 2 and DeepSeek tokenizers do), so a number's
    tokens follow its digits and a small model can learn column arithmetic; otherwise BPE merges digit runs.
    """
    texts = list(texts) if texts is not None else word_problem_lines(200)
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.pre_tokenizer = (tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level)
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN],
        padding_side="left", model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_chat_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                     config: TinyLlamaConfig = SMALL_CHAT_MODEL) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama for ``tokenizer`` (same arguments, same weights)."""
    return build_model(config, len(tokenizer), seed, tokenizer)


def save_chat_model(out: str | Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Write the model as a user's ``save_pretrained`` directory (safetensors, config, tokenizer, template)."""
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
