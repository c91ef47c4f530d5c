"""Data-parallel training under ``torchrun``: one process per device, rank 0 owns every side effect.

``torchrun --nproc_per_node N -m lmloop finetune ...`` (or ``lmloop finetune --nproc N ...``) starts N
copies of the same command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set.
:func:`init` reads them and joins the process group (gloo on CPU, NCCL when CUDA is present); without
them everything here is a no-op, so a plain single-process run pays nothing. The shared loop
(:func:`lmloop.train.train_loop`) is the only place that shards batches and averages gradients; the stages
only ask :func:`is_main` before writing files, logging or talking to MLflow.
"""

from __future__ import annotations

import os
from typing import Any


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init() -> bool:
    """Join the process group described by torchrun's environment; True when running distributed.

    Idempotent. Backend: gloo on CPU; where CUDA is present, NCCL for CUDA tensors and gloo for CPU
    ones (the loop itself trains on CPU today, so CPU tensors must keep working on a GPU node).
    """
    if _env_world() <= 1:
        return False
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        td.init_process_group(backend=backend)
    return True


def _active() -> bool:
    if _env_world() <= 1:
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def rank() -> int:
    if not _active():
        return int(os.environ.get("RANK", "0")) if _env_world() > 1 else 0
    import torch.distributed as td

    return td.get_rank()


def world_size() -> int:
    if not _active():
        return 1
    import torch.distributed as td

    return td.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in every single-process run): the one process that writes, logs and tracks."""
    return rank() == 0


def barrier() -> None:
    if _active():
        import torch.distributed as td

        td.barrier()


def all_reduce_mean(t):
    """Mean of tensor ``t`` over ranks, in place (and returned); ``t`` unchanged in a single process."""
    if _active():
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM)
        t /= td.get_world_size()
    return t


def all_reduce_sum(t):
    if _active():
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a picklable value: an early-stopping decision, metrics)."""
    if not _active():
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if _active():
        import torch.distributed as td

        td.destroy_process_group()
