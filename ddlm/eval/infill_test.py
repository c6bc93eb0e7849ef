"""`ddlm eval DIR --infill-test N`: how well a model fills a span of held-out text.

In each of N held-out sequences of L tokens a span of S tokens is hidden at a random place (at
least one token on each side). A diffusion method scores the span given both sides: its bound on
-log p(span | left, right), with `given` = everything but the span (the context is clean at every
t and not counted; the method's `nll_bound`). AR can only read the left side: its exact
-log p(span | left). Both are in bits per character of the span, so a diffusion row below AR's
means the right-hand context is worth more than the bound's slack.
"""
from __future__ import annotations

import math

import torch

from ddlm import runtime
from ddlm.build import load_for_inference, prepare_data
from ddlm.errors import ConfigError, DataError
from ddlm.eval.likelihood import summarize


def span_masks(n: int, length: int, span: int, generator: torch.Generator) -> torch.Tensor:
    """(n, L) bool: one span of `span` positions per row, starting in [1, L - span - 1]."""
    if not 1 <= span <= length - 2:
        raise ConfigError(f"--infill-span {span} must leave a token on each side: 1..{length - 2} for L={length}")
    starts = torch.randint(1, length - span, (n,), generator=generator)
    cols = torch.arange(length)[None, :]
    return (cols >= starts[:, None]) & (cols < starts[:, None] + span)


def infill_test(path, *, n: int, span: int = 16, t_samples: int = 8, seed: int = 0, split: str = "test",
                batch_size: int = 16, progress: bool = False) -> dict:
    """The span bound (diffusion) or exact left-context NLL (AR) over `n` held-out sequences."""
    if n < 1:
        raise ConfigError(f"--infill-test {n} must be at least 1 sequence")
    loaded = load_for_inference(path)
    method, model = loaded.method, loaded.model
    if not method.has_likelihood:
        raise ConfigError(f"no likelihood for method {loaded.run.method!r}: nothing to score a span with")
    _, datasets = prepare_data(loaded.run, loaded.tokenizer)
    data = datasets["valid" if split == "validation" else split]
    if len(data) == 0:
        raise DataError(f"split {split!r} holds no full sequence")
    n = min(n, len(data))
    tokens = torch.tensor(data.tokens[:n], dtype=torch.long)
    spans = span_masks(n, tokens.shape[1], span, torch.Generator().manual_seed(seed))
    left_only = not method.has_steps  # AR: the span given what precedes it
    dev = runtime.device()
    dtype = runtime.resolve_dtype(loaded.run.train.dtype, dev)
    nll, counted = [], []
    for start in range(0, n, batch_size):
        x0, hidden = tokens[start:start + batch_size].to(dev), spans[start:start + batch_size].to(dev)
        generator = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + start)
        with runtime.autocast(dtype, dev):
            if left_only:
                bound = method.nll_bound(model, x0, loss_mask=hidden)
            else:
                bound = method.nll_bound(model, x0, n_samples=t_samples, given=~hidden, generator=generator)
        nll.append(bound.nll.double().cpu())
        counted.append(bound.tokens.double().cpu())
    result = summarize(torch.cat(nll), torch.cat(counted), data.chars_per_token, bound.exact, t_samples)
    sides = "the left side only (exact)" if left_only else f"both sides (upper bound, {t_samples} t-samples)"
    return {"method": loaded.run.method, "checkpoint": str(loaded.path), "split": split, "sequences": n,
            "span": span, "context": "left" if left_only else "both", "bpc": result.bpc,
            "bpc_stderr": result.bpc_stderr, "nll_per_token": result.nll_per_token,
            "ppl": result.ppl if math.isfinite(result.ppl) else None, "tokens": result.tokens,
            "exact": result.exact, "protocol": f"{n} {split} sequences of {tokens.shape[1]} tokens, one span of "
                                                f"{span} tokens each at a random place (seed {seed}), scored "
                                                f"given {sides}; bits per character of the span"}
