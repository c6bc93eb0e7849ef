"""What every sampler returns, and the categorical draws they share."""
from __future__ import annotations

from dataclasses import dataclass

import time
from typing import Callable

import torch


@dataclass
class Generation:
    """tokens: (B, L) int64; nfe: network evaluations used; seconds: wall time of the draw."""

    tokens: torch.Tensor
    nfe: int
    seconds: float


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a parameterless callable, as in tests)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def expand_rows(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """(1 or n, K) or (K,) -> (n, K) int64: a prompt or template given once or per sample."""
    x = x.long().reshape(-1, x.shape[-1])
    if x.shape[0] not in (1, n):
        raise ValueError(f"{what} has {x.shape[0]} rows; expected 1 or n={n}")
    return x.expand(n, -1).clone()


def slide_windows(window: Callable[[torch.Tensor | None, int], tuple[torch.Tensor, int]],
                  start: torch.Tensor, length: int, context: int, stride: int) -> Generation:
    """Semi-autoregressive generation past the context (MDLM §4.3-style sliding window).

    From the prompt rows `start` (n, Lp), repeatedly keep the last (context - stride) tokens as a
    clean prefix (None when there is none yet) and call window(prefix, new) for the next `new`
    tokens, (n, new), and its NFE. Returns (n, Lp + length) tokens; nfe sums every window's.
    """
    begin = time.perf_counter()
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in 1..context={context}")
    keep = context - stride
    out, goal, nfe = start, start.shape[1] + length, 0
    while out.shape[1] < goal:
        prefix = out[:, max(0, out.shape[1] - keep):] if out.shape[1] else None
        new = min(goal - out.shape[1], context - (0 if prefix is None else prefix.shape[1]))
        tokens, used = window(prefix, new)
        out, nfe = torch.cat([out, tokens], dim=1), nfe + used
    return Generation(tokens=out, nfe=nfe, seconds=time.perf_counter() - begin)


def gumbel_argmax(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw from Cat(softmax(logp)) over the last axis with Gumbel noise in float64.

    float32 Gumbel noise truncates the tail (METHODS.md §6.1) and flatters generative perplexity.
    """
    logp = logp.double()
    u = torch.rand(logp.shape, dtype=torch.float64, generator=generator, device=logp.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logp + gumbel).argmax(dim=-1)


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; returns log-probs (float64)."""
    logits = logits.double() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        cum = sorted_logp.exp().cumsum(dim=-1)
        drop_sorted = (cum - sorted_logp.exp()) >= top_p  # keep the smallest set with mass >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp
