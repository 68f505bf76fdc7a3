"""Small helpers for vectorised work on Arrow columns: one contiguous array from a possibly chunked
column, and a boolean Arrow result as a NumPy mask."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def as_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The column as one contiguous array (chunks combined)."""
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def as_mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow result as a NumPy mask, null meaning False."""
    return as_array(pc.fill_null(values, False)).to_numpy(zero_copy_only=False)
