"""The running state of the filter chain (``stage.apply_filters``): which rows are still alive and the
reason each dropped row got, the metrics, and what several filters need computed once (normalised
texts, the policy's hidden states). It also names every reason, in the order the filters run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from prefloop.tasks.filtering.noise import Ensemble

if TYPE_CHECKING:
    from prefloop.tasks.filtering.stage import FilterConfig

FILTER_REASONS: tuple[str, ...] = (
    "nonfinite_score", "nonfinite_margin", "chosen_equals_rejected", "tie", "length_ratio", "contaminated",
    "duplicate_pair", "near_duplicate_pair", "similar_pair", "duplicate_prompt", "strength_negative", "strength_ambiguous",
    "ensemble_disagreement", "high_ches",
)
"""Every reason the filter stage can give, in the order the filters run."""

HiddenStates = Callable[[pa.Table], tuple[np.ndarray, ...]]
"""The policy's hidden-state sums of the rows of a table (:func:`~prefloop.tasks.filtering.ches.completion_hidden_states`)."""


@dataclass
class ChainState:
    """What the filters share while they run: the table (after flips), each row's reason code (−1: alive),
    the metrics, and the normalised texts and hidden states computed once for every filter that needs them."""

    pairs: pa.Table
    config: FilterConfig
    eval_prompts: pa.Array | pa.ChunkedArray | None
    hidden_states: HiddenStates | None
    ensemble: Ensemble | None = None
    standard_error: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    codes: np.ndarray = field(init=False)
    _texts: dict[tuple[str, str], pa.Array] = field(default_factory=dict)
    _states: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.full(self.pairs.num_rows, -1, dtype=np.int16)

    @property
    def alive(self) -> np.ndarray:
        return self.codes < 0

    def reject(self, reason: str, mask: np.ndarray) -> None:
        """Drop the alive rows of ``mask`` for ``reason`` (a row keeps the first reason it gets)."""
        self.codes[mask & (self.codes < 0)] = FILTER_REASONS.index(reason)

    def text(self, column: str, normalise: Callable[[pa.ChunkedArray], pa.Array]) -> pa.Array:
        """``column`` normalised by ``normalise``, computed once."""
        key = (column, normalise.__name__)
        if key not in self._texts:
            self._texts[key] = normalise(self.pairs.column(column))
        return self._texts[key]

    def states_of(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The policy's hidden-state sums of ``rows`` (sorted), each row computed once."""
        assert self.hidden_states is not None
        if "rows" not in self._states or not np.isin(rows, self._states["rows"]).all():
            self._states.update(rows=rows, states=self.hidden_states(self.pairs.take(pa.array(rows))))
        position = np.searchsorted(self._states["rows"], rows)
        return tuple(values[position] for values in self._states["states"])
