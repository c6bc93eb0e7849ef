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
                        dtype: torch.dtype = torch.float32, progress: bool = False) -> LikelihoodResult:
    """Score `dataset` under `method`'s likelihood bound; see the module docstring for the protocol."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    generator = torch.Generator(device=dev).manual_seed(seed)
    loader = BlockLoader(dataset, batch_size, shuffle=False, drop_last=False)
    nlls, counts, exact = [], [], True
    batches = loader.epoch_batches()
    total = math.ceil(len(dataset) / batch_size)
    if max_batches:
        total = min(total, max_batches)
    for i, batch in enumerate(progress_bar(batches, total=total, disable=not progress, desc="eval", leave=False)):
        if max_batches and i >= max_batches:
            break
        x0 = batch.tokens.to(dev)
        mask = batch.mask.to(dev) if batch.mask is not None else None
        with runtime.autocast(dtype, dev):
            bound = method.nll_bound(model, x0, n_samples=n_samples, loss_mask=mask, generator=generator)
        nlls.append(bound.nll.double().cpu())
        counts.append(bound.tokens.double().cpu())
        exact = exact and bound.exact
    model.train(was_training)
    return summarize(torch.cat(nlls), torch.cat(counts), dataset.chars_per_token, exact, n_samples)


def summarize(nll: torch.Tensor, tokens: torch.Tensor, chars_per_token: float, exact: bool,
              t_samples: int) -> LikelihoodResult:
    """Ratio estimator over sequences, in float64."""
    total_tokens = tokens.sum()
    ratio = nll.sum() / total_tokens
    n = nll.numel()
    resid = nll - ratio * tokens
    stderr = math.sqrt(float((resid ** 2).sum()) * n / max(n - 1, 1)) / float(total_tokens) if n > 1 else float("nan")
    to_bits = 1 / math.log(2) / chars_per_token
    return LikelihoodResult(nll_per_token=float(ratio), bpc=float(ratio) * to_bits, ppl=math.exp(float(ratio)),
                            bpc_stderr=stderr * to_bits, tokens=int(total_tokens), sequences=n,
                            exact=exact, t_samples=t_samples)
