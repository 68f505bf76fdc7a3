"""Names of the iteration policies: which model is the DPO reference in each round."""

from __future__ import annotations

from typing import Literal

ReferencePolicy = Literal["fixed", "previous_round", "mixture", "soft_sync"]
