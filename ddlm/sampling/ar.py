"""Autoregressive sampling, with a KV cache or by recomputing the prefix at every step."""
from __future__ import annotations

import time

import torch

from ddlm.errors import DataError
from ddlm.sampling.base import Generation, expand_rows, filter_logits, gumbel_argmax


class ARSampler:
    """Draws x_i ~ p(. | BOS, prompt, x_<i) one token per network evaluation."""

    def __init__(self, *, bos_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 use_cache: bool = True, banned: tuple[int, ...] = (), stride: int = 0) -> None:
        self.bos_id, self.use_cache, self.banned, self.stride = bos_id, use_cache, banned, stride
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, stride: int | None = None,
                 **_) -> Generation:
        """Return (n, len(prompt) + length) tokens: the prompt followed by `length` new ones.

        Past the context (model.cfg.max_len) generation slides: each new window restarts from BOS
        plus the last (context - stride) tokens and draws `stride` more (default: the sampler's
        stride, else context // 2). The prompt must fit the context.
        """
        start = time.perf_counter()
        device = next(model.parameters()).device
        context = model.cfg.max_len
        out = torch.empty((n, 0), dtype=torch.long, device=device) if prompt is None \
            else expand_rows(prompt.to(device), n, "prompt")
        if out.shape[1] >= context:
            raise DataError(f"prompt ({out.shape[1]} tokens) leaves no room in the model's context of "
                            f"{context} tokens")
        stride = stride or self.stride or max(1, context // 2)
        if not 0 < stride <= context:
            raise ValueError(f"stride={stride} must be in 1..context={context}")
        goal = out.shape[1] + length
        while out.shape[1] < goal:
            window = out if out.shape[1] < context else out[:, out.shape[1] - (context - stride):]
            new = min(goal - out.shape[1], context - window.shape[1])
            out = torch.cat([out, self._window(model, window, new, generator)], dim=1)
        return Generation(tokens=out, nfe=length, seconds=time.perf_counter() - start)

    def _window(self, model, prefix: torch.Tensor, length: int, generator) -> torch.Tensor:
        """`length` new tokens (n, length) after BOS + prefix, which fit the context together."""
        bos = torch.full((prefix.shape[0], 1), self.bos_id, dtype=torch.long, device=prefix.device)
        seq = torch.cat([bos, prefix], dim=1)
        cache = model.new_cache(seq.shape[0], seq.shape[1] + length) if self.use_cache else None
        logits = model(seq, mask="causal", cache=cache)[:, -1]
        for i in range(length):
            token = self.draw(logits, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if i + 1 < length:
                logits = self.next_logits(model, seq, cache)
        return seq[:, seq.shape[1] - length:]

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
