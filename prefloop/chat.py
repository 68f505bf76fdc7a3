"""Chat templates: the one place where a prompt becomes the tokens a model reads.

Artifacts store the user's plain prompt text (``prompts``, ``samples``, ``pairs`` … ``prompt`` columns),
never a rendered one, so artifacts made with different models stay comparable and can be fed to any
other model. Rendering happens at the model boundary, here, and every stage that feeds text to a
model reaches this module through the policy backends (sample, mcts, evaluate, label-judge) or
through :mod:`prefloop.forward` (reference, train, evaluate's KL, label-rm, filters that score):

* a tokenizer **with** a chat template: the prompt is one user message rendered with the generation
  prompt, ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
  tokenize=False)``, then tokenised without adding special tokens (the template writes its own bos),
  as transformers' ``apply_chat_template(tokenize=True)`` does; a completion ends with the template's
  end-of-turn token (the special token the template writes after an assistant message, e.g.
  ``<|eot_id|>``, ``<|im_end|>``), which generation stops at, besides eos, and training appends;
* a tokenizer **without** one (the embedded character model): the prompt is tokenised as it is, with
  the tokenizer's special tokens (bos), and completions end with eos: exactly the tokens of before.

Prompt and completion are tokenised separately and concatenated, in generation and in training alike,
so no BPE merge ever crosses the prompt/completion boundary and the prompt tokens a completion was
sampled after are the ones training and reference scoring put before it. An MCTS node continues a
partial answer: ``response_prefix`` (the steps so far) is part of the assistant turn, tokenised after
the rendered prompt (without a template: appended to the prompt text, as before).

A template that fails to render (bad Jinja, ``raise_exception``) is a :class:`UserError` naming the
model and the fix, raised when a backend loads the model, before a stage writes anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefloop.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

USER = "user"
ASSISTANT = "assistant"
# Content of the probe assistant message whose right-hand side reveals the end-of-turn token.
_PROBE = "prefloop-probe-answer"


class ChatTemplateError(UserError):
    """A tokenizer's chat template does not render a one-message conversation."""


def user_messages(prompt: str) -> list[dict[str, str]]:
    """The conversation a prompt is rendered as: one user message (TRL's conversational ``prompt``)."""
    return [{"role": USER, "content": prompt}]


def assistant_messages(completion: str) -> list[dict[str, str]]:
    """A completion as TRL's conversational ``chosen`` / ``rejected``: one assistant message."""
    return [{"role": ASSISTANT, "content": completion}]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts for this tokenizer's model are rendered through a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class _ChatFormat:
    """What a tokenizer's template implies, computed once per (tokenizer, template)."""

    template: str | None
    end_of_turn_id: int  # appended after a completion in training; eos without a template
    stop_ids: frozenset[int]  # generation stops at any of these


_formats: weakref.WeakKeyDictionary[Any, _ChatFormat] = weakref.WeakKeyDictionary()


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the model's tokenizer")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as error:  # noqa: BLE001 - any failure of a user's template is the same user error
        raise ChatTemplateError(
            f"the chat template of {_name(tokenizer)} fails to render a one-message conversation "
            f"({type(error).__name__}: {error}). prefloop renders every prompt as "
            "[{'role': 'user', 'content': PROMPT}] with add_generation_prompt=True. Fix the template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja in the model directory) so that it "
            "renders such a conversation, or remove it to feed plain prompts, then import the model again"
        ) from None
    if not isinstance(rendered, str):
        raise ChatTemplateError(f"the chat template of {_name(tokenizer)} rendered a {type(rendered).__name__}, not "
                                "text: give the tokenizer one template (a string), not a dictionary of named ones")
    return rendered


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, eos_id: int) -> int:
    """The special token the template writes right after an assistant message's content, else eos."""
    try:
        rendered = tokenizer.apply_chat_template(
            [*user_messages("1"), *assistant_messages(_PROBE)], add_generation_prompt=False, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses assistant turns still renders prompts: stop at eos
        return eos_id
    if not isinstance(rendered, str) or _PROBE not in rendered:
        return eos_id
    tail = rendered[rendered.rindex(_PROBE) + len(_PROBE):]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if tail_ids and tail_ids[0] in _special_ids(tokenizer):
        return int(tail_ids[0])
    return eos_id


def chat_format(tokenizer: PreTrainedTokenizerBase) -> _ChatFormat:
    """The tokenizer's rendering facts (checked and cached; recomputed when its template changes)."""
    template = getattr(tokenizer, "chat_template", None) or None
    known = _formats.get(tokenizer)
    if known is not None and known.template == template:
        return known
    if tokenizer.eos_token_id is None:
        raise UserError(f"{_name(tokenizer)} has no eos token, so generation cannot stop: set tokenizer.eos_token")
    eos_id = int(tokenizer.eos_token_id)
    if template is None:
        found = _ChatFormat(None, eos_id, frozenset({eos_id}))
    else:
        _render(tokenizer, user_messages("1"), generation_prompt=True)  # a template that raises fails here
        end_of_turn = _end_of_turn(tokenizer, eos_id)
        found = _ChatFormat(template, end_of_turn, frozenset({eos_id, end_of_turn}))
    _formats[tokenizer] = found
    return found


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise :class:`ChatTemplateError` (naming the model and the fix) when the template cannot render a
    prompt; call it where a model is loaded or imported, before anything is written."""
    chat_format(tokenizer)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model reads for ``prompt``: the rendered user turn with the generation prompt, or the
    prompt itself without a template."""
    if chat_format(tokenizer).template is None:
        return prompt
    return _render(tokenizer, user_messages(prompt), generation_prompt=True)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a completion: the template's end-of-turn token, else eos."""
    return chat_format(tokenizer).end_of_turn_id


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Generation stops at any of these: eos and, with a template, its end-of-turn token."""
    return chat_format(tokenizer).stop_ids


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], response_prefixes: Sequence[str] | None = None
) -> list[list[int]]:
    """Token ids the model reads before its completion, one list per prompt (each distinct input encoded
    once, in one tokenizer call: a fast tokenizer encodes a list text by text, so the ids are the same).

    Without a template: ``tokenizer(prompt + prefix)`` with special tokens. With one: the rendered prompt
    without added special tokens, then the ``response_prefix`` (already part of the answer) tokenised on
    its own and appended.
    """
    if response_prefixes is not None and len(response_prefixes) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(response_prefixes)} response prefixes")
    prefixes = list(response_prefixes) if response_prefixes is not None else [""] * len(prompts)
    if not prompts:
        return []
    if chat_format(tokenizer).template is None:
        texts = [prompt + prefix for prompt, prefix in zip(prompts, prefixes, strict=True)]
        return _encode_distinct(tokenizer, texts, special_tokens=True)
    rendered = {prompt: render_prompt(tokenizer, prompt) for prompt in dict.fromkeys(prompts)}
    prompt_ids = _encode_distinct(tokenizer, [rendered[prompt] for prompt in prompts], special_tokens=False)
    if not any(prefixes):
        return prompt_ids
    prefix_ids = _encode_distinct(tokenizer, prefixes, special_tokens=False)
    return [ids + more for ids, more in zip(prompt_ids, prefix_ids, strict=True)]


def encode_continuations(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of completions (or scored continuations): no special tokens, each text on its own."""
    return _encode_distinct(tokenizer, texts, special_tokens=False)


def _encode_distinct(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special_tokens: bool) -> list[list[int]]:
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return []
    encoded = dict(zip(distinct, tokenizer(distinct, add_special_tokens=special_tokens)["input_ids"], strict=True))
    return [list(encoded[text]) for text in texts]
