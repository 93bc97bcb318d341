"""Which process of how many this is: torchrun's environment, read without importing torch.

One run may span several processes (torchrun); every layer needs to know its rank (who writes
the run directory, which slice of a batch is this process's), and the CLI must know before torch
is imported. The process group itself lives in sdrun.engine.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """Where this process sits in the run: rank r of world_size (LOCAL_RANK on its node)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    grouped: bool = False  # in a process group (torchrun), even one of a single process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.grouped

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def launched_by_torchrun() -> bool:
    # TORCHELASTIC_RUN_ID: torchrun sets it for every worker, so `--nproc_per_node=1` still
    # goes through the process group (NCCL on CUDA) and DDP: one GPU can test those (not
    # SyncBatchNorm, which torch runs as plain batch norm at world size 1).
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun's environment says (0 without torchrun), before any process group."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    """This process's rank on its node as torchrun's environment says (0 without torchrun): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard(n: int, ctx: Context) -> slice:
    """This rank's contiguous part of n items (sizes differ by at most one, like tensor_split)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))
