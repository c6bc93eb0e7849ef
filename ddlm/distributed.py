"""Data parallelism applied from outside the model, on torch.distributed (as torchtitan does).

A `Distributed` is built first — a world of one unless torchrun started this process — and handed
to the trainer and the evaluator; methods never see it. With torchrun (`WORLD_SIZE`, `RANK`,
`LOCAL_RANK`, `MASTER_ADDR/PORT` in the environment) it joins the process group: NCCL on CUDA,
gloo on CPU. `wrap` applies the parallel strategy to a plain model:

  ddp    torch's DistributedDataParallel around the training step (`LossModule`: the method's loss
         as one forward, so that every submodule the method calls is covered, EDLM's energy too)
  fsdp2  torch.distributed.fsdp.fully_shard on every transformer block with trainable weights,
         then on every module that holds the remaining trainable weights; frozen weights (EDLM's
         denoiser) are not sharded as trainable: they stay whole on every rank

The global batch is the contract (`batch_plan`): train.batch_size rows per optimizer step over
all ranks, each rank taking a contiguous part of them in micro-batches of train.micro_batch_size.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ddlm.errors import ConfigError, DdlmError

PARALLELS = ("ddp", "fsdp2")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: `world` ranks x `accum` micro-batches of
    `micro` rows. Micro-batch j (0-based, global) holds rows j*micro .. (j+1)*micro - 1 of the
    global batch; rank r computes j = r*accum .. r*accum + accum - 1."""

    global_batch: int
    micro: int
    accum: int
    world: int

    def micro_indices(self, rank: int) -> range:
        return range(rank * self.accum, (rank + 1) * self.accum)


def batch_plan(global_batch: int, micro_batch: int, world: int) -> BatchPlan:
    """Split `global_batch` over `world` ranks in micro-batches of `micro_batch` rows (0: one
    micro-batch per rank); a split that does not come out even is a one-line error."""
    if global_batch % world:
        raise ConfigError(f"train.batch_size={global_batch} (the global batch) is not divisible by the "
                          f"{world} processes; choose a multiple of {world}")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the {per_rank} rows each of the "
                          f"{world} processes takes of train.batch_size={global_batch}")
    return BatchPlan(global_batch, micro, per_rank // micro, world)


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The seed of the noise of global micro-batch `micro` of optimizer step `step`: a function of
    the row positions only, so the same micro-batch draws the same noise on any number of ranks."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LossModule(nn.Module):
    """The method's loss as a module, so that DDP sees one forward per micro-batch whatever
    submodules the method calls. Returns (loss, metrics)."""

    def __init__(self, method, model: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.model = model

    def forward(self, x0, loss_mask=None, generator=None):
        out = self.method.loss(self.model, x0, loss_mask=loss_mask, generator=generator)
        return out.loss, out.metrics


@dataclass
class Distributed:
    """Rank, world size and device of this process, and the collectives the trainer needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False  # whether this object joined (and so owns) a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def from_environment(cls, device: torch.device, *, timeout_s: float = 600.0,
                         parallel: str = "ddp") -> "Distributed":
        """Join torchrun's process group when this process was started by torchrun, else a world
        of one (FSDP2 alone also gets a one-process group, which fully_shard needs)."""
        launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        if not launched and parallel != "fsdp2":
            return cls(device=device)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if launched:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, initialised=True)

    def close(self) -> None:
        """Leave the process group this object joined, all ranks together (a rank that tears
        down its connections while another is still busy can abort that one's gloo threads)."""
        if self.initialised and dist.is_initialized():
            try:
                self.barrier()
            except RuntimeError:  # a rank already gone: nothing left to wait for
                pass
            dist.destroy_process_group()
            self.initialised = False

    # -- collectives (no-ops in a world of one) -------------------------------------------------
    def on_main(self, func, *, share: bool = True):
        """func() on rank 0 only (files, locks, decisions); its result (with `share`; else None on
        the other ranks), or its one-line error, reaches every rank, so that no rank waits for a
        rank 0 that has given up."""
        result, error = None, None
        if self.is_main:
            try:
                result = func()
            except Exception as err:  # noqa: BLE001 - every rank must hear of it
                error = err
        if self.active and self.world_size > 1:
            shared, message = self.broadcast((result if share else None, None if error is None else str(error)))
            result = shared if share else result
            if error is None and message is not None:
                raise DdlmError(message)
        if error is not None:
            raise error
        return result

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of `values` over ranks (float64 on this process's device), returned on the CPU."""
        values = values.to(device=self.device, dtype=torch.float64)
        if self.active and self.world_size > 1:
            dist.all_reduce(values)
        return values.cpu()

    def all_gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """(n_r, ...) on each rank -> every rank's rows concatenated in rank order (float64)."""
        values = values.to(device=self.device, dtype=torch.float64)
        if not (self.active and self.world_size > 1):
            return values.cpu()
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([values.shape[0]], device=self.device))
        most = int(max(s.item() for s in sizes))
        padded = torch.zeros((most, *values.shape[1:]), dtype=values.dtype, device=self.device)
        padded[: values.shape[0]] = values
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()

    def broadcast(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        if not (self.active and self.world_size > 1):
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- applying the parallel strategy ----------------------------------------------------------
    def wrap(self, method, model: nn.Module, parallel: str, *, compute_dtype: torch.dtype | None = None
             ) -> nn.Module:
        """The module a training step calls as `step(x0, loss_mask, generator) -> (loss, metrics)`:
        the plain LossModule in a world of one, DDP around it, or LossModule over a model whose
        blocks fully_shard has sharded in place (`model` itself keeps its attributes)."""
        if parallel not in PARALLELS:
            raise ConfigError(f"train.parallel={parallel!r} must be one of: {', '.join(PARALLELS)}")
        step = LossModule(method, model)
        if parallel == "fsdp2" and self.active:
            shard_model(model, compute_dtype if self.device.type == "cuda" else None)
            return step
        if self.world_size == 1:
            return step
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        # gloo on CPU: 4 MB buckets start all-reducing while backward still runs (the default 25 MB
        # is one bucket for a small model, reduced only after backward; measured in
        # benchmarks/scaling.py, docs/distributed.md); NCCL keeps torch's default
        return DistributedDataParallel(step, device_ids=[self.device.index] if cuda else None,
                                       bucket_cap_mb=None if cuda else 4.0, gradient_as_bucket_view=True)

    def skip_sync(self, step_module: nn.Module, last: bool):
        """A context that, for every micro-batch but the last, keeps gradients local (accumulated);
        the last one synchronises them."""
        if hasattr(step_module, "no_sync") and not last:
            return step_module.no_sync()
        for module in sharded_roots(step_module):
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None) -> None:
    """fully_shard in place, inner groups first: every transformer block with trainable weights,
    then every Transformer with trainable weights (its embedding, norms and head), then any module
    that owns trainable parameters directly (EDLM's energy: its mask mark and score). Frozen
    weights (EDLM's denoiser) belong to no group: they stay whole on every rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ddlm.nn.transformer import Block, Transformer

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype is not None else MixedPrecisionPolicy()
    covered: set[nn.Parameter] = set()
    groups: list[nn.Module] = []  # chosen before any sharding: fully_shard replaces the parameters

    def choose(module: nn.Module) -> None:
        groups.append(module)
        covered.update(module.parameters())

    def uncovered(params) -> bool:
        return any(p.requires_grad and p not in covered for p in params)

    for kind in (Block, Transformer):
        for module in model.modules():
            if isinstance(module, kind) and uncovered(module.parameters()):
                choose(module)
    for module in reversed(list(model.modules())):
        if uncovered(module.parameters(recurse=False)):
            choose(module)
    for module in groups:
        frozen = {p for p in module.parameters() if not p.requires_grad}
        fully_shard(module, mp_policy=policy, ignored_params=frozen or None)


def sharded_roots(module: nn.Module) -> list[nn.Module]:
    """The fully_shard-ed modules under `module` that no other fully_shard-ed module contains."""
    roots: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if hasattr(m, "set_requires_gradient_sync") and not isinstance(m, LossModule):
            roots.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return roots


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def sharded_batches(loader, max_batches: int, dist: Distributed):
    """(global index, batch, real) for this rank's share of the first `max_batches` batches (0: all)
    of an unshuffled pass: batch i goes to rank i % world. Every rank gets the same number of
    rounds, so a sharded model's collectives line up; a rank with no batch left in the last round
    scores one again with real = False (its figures are not counted)."""
    total = loader.count_batches(drop_last=False)
    total = min(total, max_batches) if max_batches else total
    order = np.arange(len(loader.ds))
    for r in range(-(-total // dist.world_size)):
        i = r * dist.world_size + dist.rank
        real = i < total
        i = i if real else dist.rank % total
        yield i, loader.take(order[i * loader.batch_size:(i + 1) * loader.batch_size]), real
