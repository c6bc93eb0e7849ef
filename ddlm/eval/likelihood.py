"""Likelihood evaluation shared by every method: token-weighted NLL, BPC and PPL with a standard error.

Protocol: every sequence of the split (or the first `max_batches` batches, in order) is scored by the
method's `nll_bound` (exact for AR, a variational bound for diffusion methods with `n_samples` noise
draws per sequence). Per-sequence sums are accumulated in float64 and divided by the number of counted
tokens over the whole split: NLL/token = sum_i nll_i / sum_i n_i, PPL = exp(NLL/token),
BPC = NLL/token / ln 2 / (characters per token). The standard error is that of this ratio estimator
across sequences (delta method); for bounds it includes the Monte-Carlo noise of the time samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ddlm import runtime
from ddlm.data import BlockDataset, BlockLoader
from ddlm.progress import progress_bar


@dataclass
class LikelihoodResult:
    nll_per_token: float
    bpc: float
    ppl: float
    bpc_stderr: float
    tokens: int
    sequences: int
    exact: bool
    t_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_likelihood(method, model, dataset: BlockDataset, *, batch_size: int = 16,
                        n_samples: int = 1, max_batches: int = 0, seed: int = 0,
                        dtype: torch.dtype = torch.float32, progress: bool = False,
                        dist=None) -> LikelihoodResult:
    """Score `dataset` under `method`'s likelihood bound; see the module docstring for the protocol.
    Batch i draws its Monte-Carlo noise from a seed of (seed, i), so the figure does not depend on
    how batches are spread over processes: with `dist` (a Distributed) rank r scores batches
    r, r + world, ... and the per-sequence sums are gathered in float64 in batch order."""
    from ddlm.distributed import Distributed, micro_seed, sharded_batches

    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loader = BlockLoader(dataset, batch_size, shuffle=False, drop_last=False)
    nlls, counts, order, exact = [], [], [], True
    total = math.ceil(len(dataset) / batch_size)
    if max_batches:
        total = min(total, max_batches)
    batches = sharded_batches(loader, max_batches, dist)
    for i, batch, real in progress_bar(batches, total=-(-total // dist.world_size), disable=not progress,
                                       desc="eval", leave=False):
        generator = torch.Generator(device=dev).manual_seed(micro_seed(seed, -2, i))
        x0 = batch.tokens.to(dev)
        mask = batch.mask.to(dev) if batch.mask is not None else None
        with runtime.autocast(dtype, dev):
            bound = method.nll_bound(model, x0, n_samples=n_samples, loss_mask=mask, generator=generator)
        exact = exact and bound.exact
        if real:
            nlls.append(bound.nll.double().cpu())
            counts.append(bound.tokens.double().cpu())
            order.append(torch.full((x0.shape[0],), float(i), dtype=torch.float64))
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64)
    rows = torch.stack([torch.cat(order or [empty]), torch.cat(nlls or [empty]), torch.cat(counts or [empty])], 1)
    rows = dist.all_gather_cat(rows)
    rows = rows[torch.argsort(rows[:, 0], stable=True)]  # batch order, whatever rank scored it
    return summarize(rows[:, 1], rows[:, 2], dataset.chars_per_token, exact, n_samples)


def summarize(nll: torch.Tensor, tokens: torch.Tensor, chars_per_token: float, exact: bool,
              t_samples: int) -> LikelihoodResult:
    """Ratio estimator over sequences, in float64."""
    total_tokens = tokens.sum()
    ratio = nll.sum() / total_tokens
    n = nll.numel()
    resid = nll - ratio * tokens
    stderr = math.sqrt(float((resid ** 2).sum()) * n / max(n - 1, 1)) / float(total_tokens) if n > 1 else float("nan")
    to_bits = 1 / math.log(2) / chars_per_token
    return LikelihoodResult(nll_per_token=float(ratio), bpc=float(ratio) * to_bits, ppl=math.exp(float(ratio)) if float(ratio) < 709.0 else float("inf"),
                            bpc_stderr=stderr * to_bits, tokens=int(total_tokens), sequences=n,
                            exact=exact, t_samples=t_samples)
