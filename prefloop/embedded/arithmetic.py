"""The embedded default task: procedurally generated, exactly verifiable multi-step arithmetic.

A problem is a chain of additions and subtractions, e.g. the prompt ``16+7-2-1=?`` followed by a
newline. Its gold completion works left to right, one step per line, and ends with the answer line::

    16+7=23
    23-2=21
    21-1=20
    A:20

Everything is generated from a seed, so a problem set is reproducible, and ``verify`` checks the
final ``A:`` line exactly, so labels carry no noise.

Train and held-out problems are kept disjoint by the prompt itself: ``split_of(prompt)`` hashes the
prompt text into a split, and ``make_problems`` only keeps problems whose prompt hashes into the
requested split. A held-out prompt can therefore never appear in a training set, whatever the seeds,
sizes or difficulty settings of the two sets.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefloop.errors import UserError

Split = Literal["train", "heldout"]
ANSWER_PREFIX = "A:"
PROMPT_SUFFIX = "=?\n"
# Rejection sampling needs a bound: a configuration whose problem space is too small for the number
# of unique problems requested must fail loudly instead of looping forever.
_MAX_ATTEMPTS_PER_PROBLEM = 200


class ArithmeticTaskConfig(BaseModel):
    """Difficulty of the arithmetic task. The defaults are learnable by a 1 M-parameter model in ~1 min."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_ops: int = Field(2, ge=1, description="fewest operations (+ or -) per problem")
    max_ops: int = Field(4, ge=1, description="most operations (+ or -) per problem")
    first_operand_max: int = Field(20, ge=1, description="the first number is drawn from [operand_min, this]")
    other_operand_max: int = Field(9, ge=1, description="later numbers are drawn from [operand_min, this]")
    operand_min: int = Field(1, ge=0, description="smallest number drawn")
    allow_negative_intermediates: bool = Field(
        False, description="when False, a subtraction is only drawn if the running value stays >= 0"
    )
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of the prompt space reserved for held-out evaluation"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ArithmeticTaskConfig:
        if self.min_ops > self.max_ops:
            raise UserError(f"min_ops ({self.min_ops}) must be <= max_ops ({self.max_ops})")
        if self.operand_min > min(self.first_operand_max, self.other_operand_max):
            raise UserError("operand_min must not exceed first_operand_max or other_operand_max")
        return self


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt given to the policy, the exact answer, and a gold completion."""

    prompt: str
    answer: str
    solution: str


def split_of(prompt: str, heldout_fraction: float = 0.2) -> Split:
    """The split a prompt belongs to, decided by a stable hash of its text (independent of any seed)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    unit_interval = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if unit_interval < heldout_fraction else "train"


def _draw_chain(rng: random.Random, config: ArithmeticTaskConfig) -> tuple[int, list[tuple[str, int]]]:
    """A first number and a list of (operator, number) steps respecting the sign constraint."""
    first = rng.randint(config.operand_min, config.first_operand_max)
    running = first
    steps: list[tuple[str, int]] = []
    for _ in range(rng.randint(config.min_ops, config.max_ops)):
        number = rng.randint(config.operand_min, config.other_operand_max)
        can_subtract = config.allow_negative_intermediates or running - number >= 0
        operator = "-" if can_subtract and rng.random() < 0.5 else "+"
        running = running + number if operator == "+" else running - number
        steps.append((operator, number))
    return first, steps


def _build_problem(first: int, steps: list[tuple[str, int]]) -> Problem:
    """Render the prompt and the one-step-per-line gold solution of a chain."""
    expression = str(first) + "".join(f"{operator}{number}" for operator, number in steps)
    lines = []
    running = first
    for operator, number in steps:
        result = running + number if operator == "+" else running - number
        lines.append(f"{running}{operator}{number}={result}")
        running = result
    lines.append(f"{ANSWER_PREFIX}{running}")
    return Problem(prompt=expression + PROMPT_SUFFIX, answer=str(running), solution="\n".join(lines))


def make_problems(
    n: int, seed: int, config: ArithmeticTaskConfig | None = None, split: Split = "train"
) -> list[Problem]:
    """``n`` distinct problems of one split, deterministic for (n, seed, config, split).

    Raises ValueError when the configuration's problem space cannot supply ``n`` distinct prompts.
    """
    config = config or ArithmeticTaskConfig()
    # The split is mixed into the seed so that train and held-out draws are independent streams.
    rng = random.Random(f"prefloop.arithmetic/{seed}/{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(n * _MAX_ATTEMPTS_PER_PROBLEM):
        if len(problems) == n:
            break
        problem = _build_problem(*_draw_chain(rng, config))
        if problem.prompt in seen or split_of(problem.prompt, config.heldout_fraction) != split:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    if len(problems) < n:
        raise UserError(
            f"only {len(problems)} distinct {split} problems found for n={n} with {config!r}: "
            "widen the operand ranges or the number of operations, or ask for fewer problems"
        )
    return problems


def make_splits(
    n_train: int, n_heldout: int, seed: int, config: ArithmeticTaskConfig | None = None
) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problem sets whose prompts are disjoint by construction (see ``split_of``)."""
    return make_problems(n_train, seed, config, "train"), make_problems(n_heldout, seed, config, "heldout")


def extract_answer(completion: str) -> str | None:
    """The text after ``A:`` on the last answer line of a completion, or None if there is none."""
    for line in reversed(completion.strip().splitlines()):
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            return line[len(ANSWER_PREFIX) :].strip()
    return None


def verify(completion: str, answer: str) -> bool:
    """True when the completion's final ``A:`` answer equals the gold answer exactly."""
    return extract_answer(completion) == answer.strip()
