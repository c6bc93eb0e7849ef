"""Autoregressive sampling, with a KV cache or by recomputing the prefix at every step."""
from __future__ import annotations

import time

import torch

from ddlm.errors import DataError
from ddlm.sampling.base import Generation, Sampler, filter_logits, gumbel_argmax, model_device, prompt_rows
from ddlm.sampling.trace import note_step


class ARSampler(Sampler):
    """Draws x_i ~ p(. | BOS, prompt, x_<i) one token per network evaluation (`method.logits`).

    Past the context generation slides: each new window restarts from BOS plus the last
    (context - stride) tokens and draws `stride` more (default context // 2); a prompt that fits
    is kept whole in the first window. A template (infilling) is refused.
    """

    takes_template = False

    def __init__(self, method, *, use_cache: bool = True, banned: tuple[int, ...] | None = None,
                 **kw) -> None:
        super().__init__(method, **kw)
        self.use_cache = use_cache
        self.banned = (method.mask_id, method.pad_id) if banned is None else tuple(banned)

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 template: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> Generation:
        """(n, len(prompt) + length) tokens: the prompt followed by `length` new ones."""
        self.check_request(prompt, template)
        start = time.perf_counter()
        device = model_device(model)
        context = self.context or 1 << 62
        out = prompt_rows(prompt, n, device)
        if out.shape[1] >= context:
            raise DataError(f"prompt ({out.shape[1]} tokens) leaves no room in the model's context of "
                            f"{context} tokens")
        stride = self.stride or max(1, context // 2)
        if not 0 < stride <= context:
            raise ValueError(f"stride={stride} must be in 1..context={context}")
        goal = out.shape[1] + length
        if self.recorder is not None:
            self.recorder.start(self.masked_after(out, length))
        while out.shape[1] < goal:
            window = out if out.shape[1] < context else out[:, out.shape[1] - (context - stride):]
            new = min(goal - out.shape[1], context - window.shape[1])
            if self.recorder is not None:
                self.recorder.window(out.shape[1], nfe_before=out.shape[1] - (goal - length))
            out = torch.cat([out, self._window(model, window, new, generator)], dim=1)
        if self.recorder is not None:
            self.recorder.finish(out, length)
        return Generation(tokens=out, nfe=length, seconds=time.perf_counter() - start)

    def _window(self, model, prefix: torch.Tensor, length: int, generator) -> torch.Tensor:
        """`length` new tokens (n, length) after BOS + prefix, which fit the context together."""
        bos = torch.full((prefix.shape[0], 1), self.method.bos_id, dtype=torch.long, device=prefix.device)
        seq = torch.cat([bos, prefix], dim=1)
        cache = model.new_cache(seq.shape[0], seq.shape[1] + length) if self.use_cache else None
        logits = self.method.logits(model, seq, cache=cache)[:, -1]
        for i in range(length):
            token = self.draw(logits, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)
            note_step(self, seq[:, seq.shape[1] - i - 1:], i + 1)
            if i + 1 < length:
                step_input = seq[:, -1:] if cache is not None else seq
                logits = self.method.logits(model, step_input, cache=cache)[:, -1]
        return seq[:, seq.shape[1] - length:]

    def draw(self, logits: torch.Tensor, generator) -> torch.Tensor:
        if self.banned:
            logits = logits.clone()
            logits[:, list(self.banned)] = float("-inf")
        logp = filter_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return gumbel_argmax(logp, generator)
