"""One training run over several processes or GPUs: ``torchrun`` + ``DistributedDataParallel``, nothing home-made.

    torchrun --standalone --nproc_per_node 4 -m experiments.sweep ...   # every stage that trains; -m experiments.train

torchrun starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
this module reads them, joins the process group (NCCL on CUDA, rank r computing on ``cuda:LOCAL_RANK``; gloo on
CPU) and gives the training loop what it needs: the rank, sums over ranks, a barrier, the DDP wrapper. Without
torchrun (``WORLD_SIZE`` unset or 1) every function is the one-process no-op, so that path is unchanged.

In a stage (``experiments.lib.runs``) rank 0 runs everything — forecasts, results, plots, the ledger — and ranks > 0
only *follow*: they wait for the training jobs rank 0 starts (:func:`leading` / :func:`jobs`: the keyword arguments
of one ``training.train_lora`` call, sent over a gloo group with a long timeout, since rank 0 may forecast for a long
time between two jobs) and make the same call. :func:`finish` releases them when the stage is done.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

#: how long ranks > 0 wait for rank 0's next training job (rank 0 forecasts and writes results in between)
JOB_WAIT = timedelta(days=2)

_device: torch.device | None = None      # this rank's device, once the process group is joined
_control = None                          # gloo group for job messages
_leading = False                         # rank 0 of a stage whose other ranks wait for jobs
_in_job = False                          # rank 0 has sent a job that has not returned yet


def world_size() -> int:
    """Processes in the run: torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank: torchrun's ``RANK`` (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True when torchrun started more than one process for this run."""
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 — the only rank that writes files, logs, plots, results and charges the ledger."""
    return rank() == 0


def device(requested: str | None = None) -> torch.device:
    """The device this rank computes on: ``requested`` (None or "auto" = cuda if available, else mps if available,
    else cpu: ``miniqwen.device.resolve_device``); under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU
    per process, whatever index was asked for)."""
    from miniqwen.device import resolve_device

    d = resolve_device(requested)
    if launched() and d.type == "cuda":
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def init(on: torch.device, followers: bool = False) -> None:
    """Join the process group torchrun set up (NCCL for a CUDA device, gloo for CPU); nothing without torchrun or
    when already joined. ``followers``: this is a stage whose ranks > 0 run :func:`jobs` (rank 0 then leads)."""
    global _device, _control, _leading
    if not launched():
        return
    if _device is None:
        on = torch.device(on)
        if on.type == "cuda":
            torch.cuda.set_device(on)
        dist.init_process_group(backend="nccl" if on.type == "cuda" else "gloo")
        _device, _control = on, dist.new_group(backend="gloo", timeout=JOB_WAIT)
    _leading = _leading or (followers and is_main())


def active() -> bool:
    """True once this process has joined a process group of more than one rank."""
    return _device is not None


def sum_over_ranks(*values: int | float) -> tuple:
    """Each value summed over all ranks (one all-reduce per type: ints exactly, as int64; floats as float64).
    Without torchrun the values come back unchanged."""
    if not active():
        return values
    out = list(values)
    for kind, dtype in ((int, torch.int64), (float, torch.float64)):
        where = [i for i, v in enumerate(values) if isinstance(v, kind)]
        if where:
            t = torch.tensor([values[i] for i in where], dtype=dtype, device=_device)
            dist.all_reduce(t)
            for i, v in zip(where, t.tolist()):
                out[i] = kind(v)
    return tuple(out)


def barrier() -> None:
    """Wait until every rank gets here (no-op without torchrun)."""
    if active():
        dist.barrier()


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (its gradients, those of the parameters that require one,
    are averaged over ranks during ``backward``); the model itself without torchrun. Buffers are not re-broadcast at
    every forward (the model's are constants); parameters are synced from rank 0 once, when wrapping."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


@contextmanager
def leading(job: dict):
    """Rank 0 of a stage under torchrun: send ``job`` (keyword arguments of ``training.train_lora``) to the ranks in
    :func:`jobs`, for the body to make the same call here. If the body raises, the other ranks are left inside the
    job: torchrun stops them when this process exits with the error. No-op otherwise."""
    global _in_job
    if not _leading:
        yield
        return
    dist.broadcast_object_list([job], src=0, group=_control)
    _in_job = True
    yield
    _in_job = False


def jobs():
    """Ranks > 0 of a stage under torchrun: yield each job rank 0 sends with :func:`leading`, until it says done."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=_control)
        if box[0] is None:
            dist.barrier(group=_control)
            return
        yield box[0]


def finish() -> None:
    """Leave the process group (no-op without torchrun). Rank 0 of a stage first tells the ranks waiting in
    :func:`jobs` that it is done — unless a job failed midway: they are then inside it, and torchrun stops them
    when this process exits with the error."""
    global _device, _control, _leading
    if not active():
        return
    try:
        if _leading and not _in_job:
            dist.broadcast_object_list([None], src=0, group=_control)
            dist.barrier(group=_control)
        dist.destroy_process_group()
    except RuntimeError as err:  # a peer is gone already: nothing left to release
        print(f"warning: leaving the process group: {err}", file=sys.stderr)
    _device, _control, _leading = None, None, False
