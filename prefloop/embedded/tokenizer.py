"""A character-level tokenizer for the embedded arithmetic task, built locally (no download).

Every character of the alphabet is one token, so tokenisation is exact and the same on every
machine. Built with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast`` so it
saves and loads like any Hugging Face tokenizer (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
else:
    tokenizers = deferred_import("tokenizers")
    transformers = deferred_import("transformers")

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Digits, the operators and the answer marker of the task, plus a few characters so that slightly
# different prompt formats still tokenise without unknown tokens.
ALPHABET = "0123456789+-*/=?:A \n"


def _build_raw_tokenizer(alphabet: str) -> Tokenizer:
    """The ``tokenizers`` object: special tokens first (ids 0..3), then one id per character."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in alphabet:
        vocab.setdefault(character, len(vocab))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # `[\s\S]` rather than `.`: the dot does not match newlines, which are the step separator here.
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    # Without Fuse the decoder would join the characters with spaces.
    tokenizer.decoder = tokenizers.decoders.Fuse()
    # Every encoded prompt starts with <bos>, so generation and training see the same positions.
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return tokenizer


def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer with pad/bos/eos/unk tokens and left padding.

    Left padding is the default because batched generation needs it; training code pads explicitly.
    """
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_build_raw_tokenizer(alphabet),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
