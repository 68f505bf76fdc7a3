"""Task definitions: how an answer is read out of a completion and how it is checked.

A task is verifiable when a completion's final answer can be extracted and compared with the
prompt's reference answer (the verifiable signal of Tülu 3's RLVR, Lambert et al. 2024). A
:class:`TaskDefinition` names both halves:

* **extract** — where the answer sits in the completion:

  - ``last_number``: the last number in the text (``-1,234.5`` → ``-1234.5``), the GSM8K convention;
  - ``boxed``: the content of the last ``\\boxed{…}`` (nested braces balanced), the MATH convention;
  - ``answer_line``: the text after ``prefix`` on the last line that starts with it (``Answer:``,
    or ``A:`` in the embedded arithmetic task);
  - ``regex``: the last match of ``pattern`` (its group ``answer`` if named, else group 1, else the match);
  - ``full_text``: the whole completion, stripped.

* **check** — when the extracted answer counts as the reference answer:

  - ``exact``: equal strings after stripping (optionally ignoring case and inner whitespace);
  - ``numeric``: both parse as numbers and |a − r| ≤ max(abs_tol, rel_tol·|r|);
  - ``math_verify``: symbolic equivalence with `math-verify` (Hugging Face): both sides are parsed
    to SymPy (LaTeX and plain expressions) and compared, so ``\\frac{1}{2}``, ``0.5`` and ``1/2``
    agree. math-verify's own timeouts use ``signal.alarm``, which only works in the main thread;
    stages run in Prefect's worker threads, so they are switched off here (``parsing_timeout=None,
    timeout_seconds=None``).

Outcome score: 1.0 when the check passes, 0.0 otherwise. A completion with no extractable answer
has verdict ``unparseable`` (``truncated`` when generation hit the length limit); a reference
answer that cannot be parsed by the checker makes the prompt unverifiable (``unparseable_reference``).

The embedded arithmetic task is the preset ``arithmetic`` (``answer_line`` with prefix ``A:`` and
``exact``); ``gsm8k`` and ``math`` are presets for the common public formats.
"""

from __future__ import annotations

import logging
import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefloop.errors import UserError

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


class AnswerExtraction(BaseModel):
    """Where a completion's final answer is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["last_number", "boxed", "answer_line", "regex", "full_text"] = "answer_line"
    prefix: str = Field("Answer:", description="answer_line: the line's prefix (case-sensitive)")
    pattern: str | None = Field(None, description="regex: the pattern (group 'answer', else group 1, else the match)")

    @model_validator(mode="after")
    def _check(self) -> AnswerExtraction:
        if self.kind == "regex":
            if not self.pattern:
                raise UserError("extract kind 'regex' needs a 'pattern', e.g. pattern: 'final answer is (\\S+)'")
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise UserError(f"extract pattern {self.pattern!r} is not a valid regular expression: {error}") from None
        if self.kind == "answer_line" and not self.prefix:
            raise UserError("extract kind 'answer_line' needs a non-empty 'prefix' (e.g. 'Answer:')")
        return self


class AnswerCheck(BaseModel):
    """When an extracted answer counts as the reference answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["exact", "numeric", "math_verify"] = "exact"
    case_sensitive: bool = Field(True, description="exact: compare case")
    collapse_whitespace: bool = Field(False, description="exact: ignore differences in inner whitespace")
    abs_tol: float = Field(1e-6, ge=0.0, description="numeric: absolute tolerance")
    rel_tol: float = Field(0.0, ge=0.0, description="numeric: relative tolerance (of the reference)")
    float_rounding: int = Field(6, ge=0, description="math_verify: decimal places numbers are rounded to")


class TaskDefinition(BaseModel):
    """A verifiable task: a name, how its answers are extracted and how they are checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("arithmetic", min_length=1)
    extract: AnswerExtraction = Field(default_factory=AnswerExtraction)
    check: AnswerCheck = Field(default_factory=AnswerCheck)

    @cached_property
    def _regex(self) -> re.Pattern[str] | None:
        return re.compile(self.extract.pattern) if self.extract.pattern else None

    def extract_answer(self, completion: str) -> str | None:
        """The completion's final answer as text, or None when it has none."""
        kind = self.extract.kind
        if kind == "last_number":
            found = _NUMBER.findall(completion)
            return found[-1].replace(",", "") if found else None
        if kind == "boxed":
            return last_boxed(completion)
        if kind == "answer_line":
            prefix = self.extract.prefix
            for line in reversed(completion.strip().splitlines()):
                line = line.strip()
                if line.startswith(prefix):
                    return line[len(prefix):].strip() or None
            return None
        if kind == "regex":
            matches = list(self._regex.finditer(completion))
            if not matches:
                return None
            match = matches[-1]
            if "answer" in match.re.groupindex:
                value = match.group("answer")
            else:
                value = match.group(1) if match.re.groups else match.group(0)
            return value.strip() if value and value.strip() else None
        text = completion.strip()
        return text or None

    def parse_reference(self, reference: str) -> Any:
        """The reference answer in the checker's form, or None when the checker cannot read it."""
        check = self.check.kind
        if check == "exact":
            return self._normalise(reference) or None
        if check == "numeric":
            return _to_number(reference)
        # A reference may be given bare ("1/2") or boxed; math-verify reads both.
        parsed = _math_parse(reference if "\\boxed" in reference or "$" in reference else f"${reference}$")
        return parsed or None

    def is_correct(self, extracted: str, reference: Any) -> bool:
        """True when ``extracted`` matches a reference prepared by :meth:`parse_reference`."""
        check = self.check.kind
        if check == "exact":
            return self._normalise(extracted) == reference
        if check == "numeric":
            value = _to_number(extracted)
            if value is None:
                return False
            return abs(value - reference) <= max(self.check.abs_tol, self.check.rel_tol * abs(reference))
        target = _math_parse(extracted if "\\boxed" in extracted or "$" in extracted else f"${extracted}$")
        if not target:
            return False
        return _math_verify(reference, target, self.check.float_rounding)

    def verify(self, completion: str, reference: str) -> bool:
        """True when the completion's extracted answer matches ``reference`` (False when either cannot be read)."""
        extracted = self.extract_answer(completion)
        if extracted is None:
            return False
        parsed = self.parse_reference(reference)
        return parsed is not None and self.is_correct(extracted, parsed)

    def _normalise(self, text: str) -> str:
        text = text.strip()
        if self.check.collapse_whitespace:
            text = " ".join(text.split())
        return text if self.check.case_sensitive else text.casefold()

    @property
    def version(self) -> str:
        """What a label row records as its labeler version: the task's extraction and check."""
        extract = self.extract.kind + (f"({self.extract.prefix})" if self.extract.kind == "answer_line" else "")
        extract += f"({self.extract.pattern})" if self.extract.kind == "regex" else ""
        return f"{self.name}:{extract}+{self.check.kind}"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    index = text.index("{", start) + 1
    depth, begin = 1, index
    while index < len(text):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                content = text[begin:index].strip()
                return content or None
        index += 1
    return None  # unbalanced: the box never closes


def _to_number(text: str) -> float | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        found = _NUMBER.findall(text)
        if len(found) != 1:
            return None
        value = float(found[0].replace(",", ""))
    return value if value == value and abs(value) != float("inf") else None


def _math_parse(text: str) -> list:
    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without timeouts
    # no_fallback: text that is no expression at all ("???") parses to nothing instead of to itself.
    return parse(text, fallback_mode="no_fallback", parsing_timeout=None)


def _math_verify(gold: list, target: list, float_rounding: int) -> bool:
    from math_verify import verify

    return bool(verify(gold, target, float_rounding=float_rounding, timeout_seconds=None))


# Named task definitions a config can refer to by name (``task: gsm8k``) instead of spelling them out.
TASKS: dict[str, TaskDefinition] = {
    "arithmetic": TaskDefinition(name="arithmetic", extract=AnswerExtraction(kind="answer_line", prefix="A:"),
                                 check=AnswerCheck(kind="exact")),
    "gsm8k": TaskDefinition(name="gsm8k", extract=AnswerExtraction(kind="last_number"),
                            check=AnswerCheck(kind="numeric")),
    "math": TaskDefinition(name="math", extract=AnswerExtraction(kind="boxed"), check=AnswerCheck(kind="math_verify")),
    "answer_line": TaskDefinition(name="answer_line", extract=AnswerExtraction(kind="answer_line", prefix="Answer:"),
                                  check=AnswerCheck(kind="math_verify")),
}


def resolve_task(task: str | TaskDefinition) -> TaskDefinition:
    """A task definition from its preset name or itself."""
    if isinstance(task, TaskDefinition):
        return task
    if task not in TASKS:
        raise UserError(f"unknown task '{task}': presets are {', '.join(sorted(TASKS))}, or give a definition "
                         "with name, extract {kind: last_number|boxed|answer_line|regex|full_text} and "
                         "check {kind: exact|numeric|math_verify}")
    return TASKS[task]
