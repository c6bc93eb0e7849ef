"""Autoregressive sampling, with a KV cache or by recomputing the prefix at every step."""
from __future__ import annotations

import time

import torch

from ddlm.errors import DataError
from ddlm.sampling.base import Generation, filter_logits, gumbel_argmax


class ARSampler:
    """Draws x_i ~ p(. | BOS, prompt, x_<i) one token per network evaluation."""

    def __init__(self, *, bos_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 use_cache: bool = True, banned: tuple[int, ...] = ()) -> None:
        self.bos_id, self.use_cache, self.banned = bos_id, use_cache, banned
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **_) -> Generation:
        """Return (n, len(prompt) + length) tokens: the prompt followed by `length` new ones."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        seq = torch.full((n, 1), self.bos_id, dtype=torch.long, device=device)
        if prompt is not None:
            seq = torch.cat([seq, prompt.to(device).long().reshape(-1, prompt.shape[-1]).expand(n, -1)], 1)
        if seq.shape[1] - 1 + length > model.cfg.max_len:
            raise DataError(f"prompt ({seq.shape[1] - 1} tokens) + length ({length}) exceed the model's "
                            f"context of {model.cfg.max_len} tokens")
        cache = model.new_cache(n, seq.shape[1] + length) if self.use_cache else None
        logits = model(seq, mask="causal", cache=cache)[:, -1]
        for i in range(length):
            token = self.draw(logits, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if i + 1 < length:
                logits = self.next_logits(model, seq, cache)
        return Generation(tokens=seq[:, 1:], nfe=length, seconds=time.perf_counter() - start)

    def next_logits(self, model, seq: torch.Tensor, cache) -> torch.Tensor:
        if cache is not None:
            return model(seq[:, -1:], mask="causal", cache=cache)[:, -1]
        return model(seq, mask="causal")[:, -1]

    def draw(self, logits: torch.Tensor, generator) -> torch.Tensor:
        if self.banned:
            logits = logits.clone()
            logits[:, list(self.banned)] = float("-inf")
        logp = filter_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return gumbel_argmax(logp, generator)
