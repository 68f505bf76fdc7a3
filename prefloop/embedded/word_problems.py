"""A generated GSM8K-style task: short stories with several steps and a numeric answer.

A problem is a story about one person and one kind of object, told one event per sentence, then a
question; its gold solution works the events out one per line, and ends with GSM8K's answer line::

    Mia has 12 apples. Mia buys 3 bags of 4 apples each. Mia gives 6 apples to Tom.
    Mia splits the apples into 3 equal groups and keeps one group. How many apples does Mia have now?

    3*4=12
    12+12=24
    24-6=18
    18/3=6
    #### 6

The answer is read the way the ``gsm8k`` task of :mod:`prefloop.tasks.answers` reads it (the last
number of the completion, compared numerically), so the loop's verifier checks these answers as it
would check GSM8K's.

Events: ``buy`` (+k), ``give`` (−k, to another person), ``lose`` (−k), ``packs`` (+p·q, two lines),
``share`` (÷k, drawn only when k divides the running value), ``double`` (×2). The running value
stays within [0, ``value_max``]: an event that would leave it is not drawn.

Everything is generated from a seed. Train and held-out problems are disjoint by the prompt itself,
as in :mod:`prefloop.embedded.arithmetic`: ``split_of(prompt)`` hashes the prompt text into a split
and ``make_problems`` only keeps problems whose prompt hashes into the requested one, whatever the
seeds, sizes or difficulty settings of the two sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefloop.embedded.arithmetic import Problem, Split, split_of
from prefloop.errors import UserError
from prefloop.tasks.answers import TASKS

Event = Literal["buy", "give", "lose", "packs", "share", "double"]
EVENTS: tuple[Event, ...] = ("buy", "give", "lose", "packs", "share", "double")
ANSWER_PREFIX = "#### "
NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Max", "Zoe", "Ben", "Eva", "Leo", "Amy", "Dan", "Kim", "Raj",
         "Sue")
ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "eggs", "stamps", "marbles", "stickers", "cookies",
         "pencils", "beads", "rocks", "candies", "toys")
CONTAINERS = ("bags", "boxes", "packs", "jars", "baskets")
TASK = TASKS["gsm8k"]
# Rejection sampling needs a bound, as in the arithmetic task.
_MAX_ATTEMPTS_PER_PROBLEM = 200


class WordProblemConfig(BaseModel):
    """Difficulty of the word-problem task: how many events a story has and how large its numbers are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_steps: int = Field(2, ge=1, description="fewest events per story")
    max_steps: int = Field(4, ge=1, description="most events per story")
    start_min: int = Field(5, ge=0, description="the starting amount is drawn from [start_min, start_max]")
    start_max: int = Field(30, ge=1)
    amount_max: int = Field(12, ge=1, description="a bought, given or lost amount is drawn from [1, amount_max]")
    pack_max: int = Field(5, ge=2, description="packs: p and q are drawn from [2, pack_max]")
    share_max: int = Field(4, ge=2, description="share: the number of shares is drawn from [2, share_max]")
    value_max: int = Field(99, ge=2, description="the running amount never exceeds this")
    events: tuple[Event, ...] = Field(EVENTS, min_length=1, description="the events a story may contain")
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of the prompt space reserved for held-out evaluation")

    @model_validator(mode="after")
    def _check_ranges(self) -> WordProblemConfig:
        if self.min_steps > self.max_steps:
            raise UserError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        if self.start_min > self.start_max:
            raise UserError(f"start_min ({self.start_min}) must be <= start_max ({self.start_max})")
        if self.start_max > self.value_max:
            raise UserError(f"start_max ({self.start_max}) must be <= value_max ({self.value_max})")
        return self


@dataclass(frozen=True)
class Step:
    """One event's arithmetic on the running value: ``value op operand``; ``pack`` (p, q) when the operand
    is itself a product p·q, worked out on a line of its own first."""

    op: Literal["+", "-", "*", "/"]
    operand: int
    pack: tuple[int, int] | None = None

    def apply(self, value: int) -> int:
        if self.op == "+":
            return value + self.operand
        if self.op == "-":
            return value - self.operand
        return value * self.operand if self.op == "*" else value // self.operand


@dataclass(frozen=True)
class WordProblem(Problem):
    """A problem with its arithmetic kept: the starting amount and the steps, from which solutions are
    rendered (the gold one, and wrong ones for reward-model pairs)."""

    start: int = 0
    steps: tuple[Step, ...] = ()


def render_solution(start: int, steps: tuple[Step, ...], wrong_at: int | None = None, delta: int = 0) -> str:
    """The solution, one step per line, ending ``#### ANSWER``; with ``wrong_at`` that step's result is off
    by ``delta`` and the later steps carry the error on (a plausible wrong solution)."""
    lines, value = [], start
    for index, step in enumerate(steps):
        if step.pack is not None:
            lines.append(f"{step.pack[0]}*{step.pack[1]}={step.operand}")
        new = step.apply(value) + (delta if index == wrong_at else 0)
        lines.append(f"{value}{step.op}{step.operand}={new}")
        value = new
    lines.append(f"{ANSWER_PREFIX}{value}")
    return "\n".join(lines)


def _draw_event(event: Event, value: int, name: str, item: str, rng: random.Random,
                config: WordProblemConfig) -> tuple[str, Step] | None:
    """The event's sentence and step, or None when it cannot apply to ``value`` (it would leave
    [0, value_max], or no share divides it)."""
    if event in ("buy", "give", "lose"):
        k = rng.randint(1, config.amount_max)
        if event == "buy":
            return (f"{name} buys {k} more {item}.", Step("+", k)) if value + k <= config.value_max else None
        if value - k < 0:
            return None
        other = rng.choice([n for n in NAMES if n != name])
        sentence = f"{name} gives {k} {item} to {other}." if event == "give" else f"{name} loses {k} {item}."
        return sentence, Step("-", k)
    if event == "packs":
        p, q = rng.randint(2, config.pack_max), rng.randint(2, config.pack_max)
        if value + p * q > config.value_max:
            return None
        return f"{name} buys {p} {rng.choice(CONTAINERS)} of {q} {item} each.", Step("+", p * q, (p, q))
    if event == "share":
        divisors = [k for k in range(2, config.share_max + 1) if value >= k and value % k == 0]
        if not divisors:
            return None
        k = rng.choice(divisors)
        return f"{name} splits the {item} into {k} equal groups and keeps one group.", Step("/", k)
    if value * 2 > config.value_max:  # double
        return None
    other = rng.choice([n for n in NAMES if n != name])
    return f"{other} gives {name} as many {item} as {name} has.", Step("*", 2)


def _draw_problem(rng: random.Random, config: WordProblemConfig) -> WordProblem | None:
    """One story, or None when an event could not be drawn (the caller draws again)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(config.start_min, config.start_max)
    sentences, steps = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        # A few tries per step: most events apply to most values, and a story must keep its length.
        for _attempt in range(10):
            drawn = _draw_event(rng.choice(config.events), value, name, item, rng, config)
            if drawn is not None:
                break
        else:
            return None
        sentences.append(drawn[0])
        steps.append(drawn[1])
        value = drawn[1].apply(value)
    sentences.append(f"How many {item} does {name} have now?")
    return WordProblem(prompt=" ".join(sentences), answer=str(value),
                       solution=render_solution(start, tuple(steps)), start=start, steps=tuple(steps))


def make_problems(n: int, seed: int, config: WordProblemConfig | None = None, split: Split = "train"
                  ) -> list[WordProblem]:
    """``n`` distinct problems of one split, deterministic for (n, seed, config, split).

    Raises UserError when the configuration's problem space cannot supply ``n`` distinct prompts.
    """
    config = config or WordProblemConfig()
    # The split is mixed into the seed so that train and held-out draws are independent streams.
    rng = random.Random(f"prefloop.word_problems/{seed}/{split}")
    problems: list[WordProblem] = []
    seen: set[str] = set()
    for _ in range(n * _MAX_ATTEMPTS_PER_PROBLEM):
        if len(problems) == n:
            break
        problem = _draw_problem(rng, config)
        if problem is None or problem.prompt in seen or split_of(problem.prompt, config.heldout_fraction) != split:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    if len(problems) < n:
        raise UserError(f"only {len(problems)} distinct {split} word problems found for n={n} with {config!r}: "
                        "widen the number ranges or the steps, or ask for fewer problems")
    return problems


def make_splits(n_train: int, n_heldout: int, seed: int, config: WordProblemConfig | None = None
                ) -> tuple[list[WordProblem], list[WordProblem]]:
    """Train and held-out problem sets whose prompts are disjoint by construction (see ``split_of``)."""
    return make_problems(n_train, seed, config, "train"), make_problems(n_heldout, seed, config, "heldout")


def verify(completion: str, answer: str) -> bool:
    """The loop's verifier for this task: the ``gsm8k`` preset (last number, numeric comparison)."""
    return TASK.verify(completion, answer)


def wrong_solution(problem: WordProblem, rng: random.Random) -> str:
    """A plausible wrong solution whose final answer differs from the gold one: one step's result (any
    step, chosen at random) is off by a small amount and the later steps carry the error on."""
    for _attempt in range(20):
        wrong_at = rng.randrange(len(problem.steps))
        delta = rng.choice((-3, -2, -1, 1, 2, 3))
        solution = render_solution(problem.start, problem.steps, wrong_at, delta)
        if not verify(solution, problem.answer):
            return solution
    # Every drawn error was undone by a later step (e.g. halving): put it on the final answer instead.
    return render_solution(problem.start, problem.steps, len(problem.steps) - 1, 1 if int(problem.answer) == 0 else -1)
