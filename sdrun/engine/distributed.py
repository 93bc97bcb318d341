"""One run on many processes: DistributedDataParallel set up from torchrun's environment.

    torchrun --nproc_per_node=N --no-python sdrun train ...

starts N copies of `sdrun train` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in their environment; `init()` joins them into one process group. Without
those variables everything here is a no-op and sdrun trains in one process as before.

How a distributed run stays equal to one process over the same global batch:
- `batch_size` is the GLOBAL batch. Every rank seeds the data generator and the gate
  generator from the run seed, so each rank computes the same permutation, the same
  augmentation and the same gates; a rank trains on its contiguous slice of each global
  batch (`shard`). Each epoch reshuffles (the generator moves on), like
  DistributedSampler.set_epoch, without any communication. `check_identical` verifies
  once per epoch that the ranks' gates and data generators still agree.
- The same gates on every rank means the same blocks are skipped everywhere, so a
  skipped block's parameters are unused on ALL ranks at once. DDP is built with
  find_unused_parameters=True, which makes its reducer mark those parameters ready
  instead of waiting for gradients that never come; a parameter unused on every rank
  keeps the .grad it had. The trainer zeroes gradients in place (never None), so that
  .grad is zero and SGD applies weight decay and momentum to it exactly as in one process.
- Each rank's loss is its slice's mean scaled by slice/global size x world size
  (`loss_weight`), so DDP's gradient average is the gradient of the global-batch mean
  even when the last batch does not split evenly.
- BatchNorm normalises with per-rank statistics (so the loss is close to, not equal to,
  one process over the global batch) unless `sync_bn=true` (CUDA only: torch's
  SyncBatchNorm has no CPU kernel). Running statistics are rank 0's: DDP broadcasts
  buffers from rank 0 before every training forward, so after an epoch's last step each
  rank's statistics still hold its own last half-batch; `broadcast_buffers` makes them
  rank 0's (the checkpointed ones) again before every evaluation.
- Evaluation is sharded: each rank counts the errors of its slice of the val/test split
  with the same (rank 0's) model, and the counts are summed, so every rank holds the error
  that the checkpointed model has on the whole split.
- Only rank 0 writes (TensorBoard events, metrics.jsonl, checkpoint.pt, results.json, and
  Hydra's .hydra/ and train.log); every rank reads the checkpoint to resume.

Collectives on CPU tensors go through gloo, on CUDA tensors through NCCL (the backend
string "cpu:gloo,cuda:nccl"), so small control messages never touch the GPU.
CI tests the gloo/CPU path; tests/test_cuda.py runs one NCCL process under torchrun on a GPU
(DDP, the process group). It cannot test SyncBatchNorm: at world size 1 torch's SyncBatchNorm
falls back to plain batch norm, so sync_bn's cross-process statistics need 2 or more GPUs.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sdrun.config import ConfigError
from sdrun.ranks import SINGLE, Context, env_local_rank, launched_by_torchrun


def init() -> Context:
    """Join the process group described by torchrun's environment (no-op without one)."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # NCCL and object collectives use the current device: one GPU per local rank
            torch.cuda.set_device(env_local_rank())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return current()


def current() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Context(dist.get_rank(), dist.get_world_size(), env_local_rank(), grouped=True)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- device, model, data slices

def place(device: torch.device, ctx: Context) -> torch.device:
    """Each rank of a CUDA run takes the GPU of its local rank."""
    if not ctx.distributed or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank:
        raise ConfigError(f"device={device} under torchrun: use device=auto or cuda "
                          f"(rank {ctx.rank} takes cuda:LOCAL_RANK = cuda:{ctx.local_rank})")
    return torch.device("cuda", ctx.local_rank)


def wrap(model: torch.nn.Module, device: torch.device, ctx: Context, sync_bn: bool) -> torch.nn.Module:
    """The module to call in training: DDP around `model` when distributed, else `model`.

    SyncBatchNorm keeps the same parameter objects and state_dict keys, so the optimiser
    may be built on `model` before or after and checkpoints stay interchangeable.
    """
    if not ctx.distributed:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def loss_weight(local: int, global_: int, ctx: Context) -> float:
    """Factor on a rank's mean loss so that DDP's average gives the global-batch mean's gradient."""
    return local * ctx.world_size / global_


# ---------------------------------------------------------------- collectives

def sum_(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum over ranks in place (no-op in one process); returns the tensor."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def first_step(step: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The earliest step over ranks, where -1 means none on that rank (-1 if none anywhere)."""
    if not ctx.distributed:
        return step
    none = torch.iinfo(torch.int64).max
    t = torch.where(step < 0, none, step)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return torch.where(t == none, -1, t)


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when it is true on at least one (a CPU tensor: gloo, no GPU sync)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def fingerprint(*tensors: torch.Tensor) -> int:
    """CRC32 of tensors' bytes: cheap to compare across ranks."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def check_identical(what: str, value: int, ctx: Context) -> None:
    """Raise on every rank if `value` is not the same on all ranks."""
    if not ctx.distributed:
        return
    gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.int64))
    values = [int(t.item()) for t in gathered]
    if len(set(values)) > 1:
        raise RuntimeError(f"{what} differ across ranks (fingerprints by rank: {values}); "
                           f"every rank must run the same sdrun version and config")


def broadcast_str(text: str | None, ctx: Context) -> str:
    """Rank 0's string on every rank (CPU tensors, so gloo carries it even on a CUDA run)."""
    if not ctx.distributed:
        return text
    data = torch.tensor(list((text or "").encode()) if ctx.is_main else [], dtype=torch.uint8)
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    if not ctx.is_main:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode()
