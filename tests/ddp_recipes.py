"""Recipes for the data-parallel launch tests, in a module of their own: the spawned ranks import it
to unpickle them, and it imports nothing but torch (a rank starts faster)."""

import os
import signal

import torch


def failing_recipe(model, *, progress=None, data_parallel=None):
    """Rank 1 raises; rank 0 waits for it in a collective that never completes."""
    if data_parallel.rank == 1:
        raise ValueError("rank 1 could not read its shard")
    torch.distributed.barrier()
    return []


def dying_recipe(model, *, progress=None, data_parallel=None):
    """Rank 1 is killed (as by the out-of-memory killer); rank 0 waits for it in a collective."""
    if data_parallel.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    torch.distributed.barrier()
    return []
