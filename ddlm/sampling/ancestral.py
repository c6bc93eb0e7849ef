"""Samplers for masked diffusion (MDLM): ancestral with the no-change cache, and first-hitting.

Both call the network through one helper, `MaskedSampler.denoise`: logits -> SUBS log x_theta
(float64), banned tokens removed, then temperature / top-k / nucleus filtering. Categorical draws
use float64 Gumbel noise (METHODS.md §6.1).

Conditioning: `prompt` (B or 1, Lp) fixes the first Lp positions (output: prompt + `length` new
tokens, as the AR sampler); `template` (B or 1, L) fixes every position that is not MASK and
generates the rest (infilling). Given tokens are never changed: SUBS carries unmasked tokens over.
Sequences longer than the model's context are generated semi-autoregressively (`generate_long`).
"""
from __future__ import annotations

import time

import torch

from ddlm.methods.mdlm import subs_log_probs
from ddlm.process.schedules import Schedule
from ddlm.sampling.base import (Generation, expand_rows, filter_logits, gumbel_argmax, model_device,
                                slide_windows)


class MaskedSampler:
    """Shared parts: the denoiser call, the initial state, and semi-autoregressive generation."""

    def __init__(self, *, schedule: Schedule, mask_id: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, time_conditioned: bool = False,
                 banned: tuple[int, ...] = (), stride: int = 0) -> None:
        self.schedule, self.mask_id, self.banned = schedule, mask_id, tuple(banned)
        self.stride = stride  # tokens per window past the context (0: context // 2)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.time_conditioned = time_conditioned

    def conditioned(self, model) -> bool:
        """Time-conditioned if the method says so or the backbone was built with conditioning."""
        cfg = getattr(model, "cfg", None)
        return self.time_conditioned or bool(getattr(cfg, "time_conditioning", False))

    def denoise(self, model, z: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """log x_theta(z_t) (B, L, V) float64 under SUBS, filtered for sampling; t scalar or (B,)."""
        sigma = None
        if self.conditioned(model):
            t_b = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
            sigma = self.schedule.total_noise(t_b).float()
        logits = model(z, sigma=sigma, mask="bidirectional").to(torch.float64, copy=True)  # (B, L, V)
        if self.banned:
            logits[..., list(self.banned)] = float("-inf")
        logp = subs_log_probs(logits, z, self.mask_id, dtype=torch.float64)
        if self.temperature != 1.0 or self.top_k or self.top_p < 1.0:
            logp = filter_logits(logp, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return logp

    def initial_state(self, n: int, length: int, prompt, template, device) -> torch.Tensor:
        """(n, L) int64: given tokens where fixed, MASK elsewhere."""
        if prompt is not None and template is not None:
            raise ValueError("give a prompt or a template, not both")
        if template is not None:
            return expand_rows(template.to(device), n, "template")
        z = torch.full((n, length), self.mask_id, dtype=torch.long, device=device)
        if prompt is not None:
            z = torch.cat([expand_rows(prompt.to(device), n, "prompt"), z], dim=1)
        return z

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 template: torch.Tensor | None = None) -> Generation:
        """(n, Lp + length) tokens, or (n, L) for a template (then `length` is not used). Longer
        than the model's context (model.cfg.max_len): delegated to `generate_long`."""
        context = getattr(getattr(model, "cfg", None), "max_len", 0)
        total = length + (prompt.shape[-1] if prompt is not None else 0)
        if template is None and context and total > context:
            return self.generate_long(model, n, length, prompt=prompt, generator=generator)
        start = time.perf_counter()
        z = self.initial_state(n, length, prompt, template, model_device(model))
        z, nfe = self.run(model, z, generator)
        return Generation(tokens=z, nfe=nfe, seconds=time.perf_counter() - start)

    def run(self, model, z: torch.Tensor, generator) -> tuple[torch.Tensor, int]:
        """Unmask every MASK of z; returns (tokens, network evaluations)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate_long(self, model, n: int, total_length: int, *, context: int | None = None,
                      stride: int | None = None, prompt: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> Generation:
        """Semi-autoregressive generation past the context (MDLM §4.3-style sliding window).

        Generate a full context; then repeatedly keep the last (context - stride) tokens as a
        clean prefix and generate `stride` new ones after them. Returns (n, Lp + total_length)
        tokens; nfe sums every window's.
        """
        context = context or model.cfg.max_len
        device = model_device(model)
        start = torch.empty((n, 0), dtype=torch.long, device=device) if prompt is None \
            else expand_rows(prompt.to(device), n, "prompt")

        def window(prefix, new):
            z, used = self.run(model, self.initial_state(n, new, prefix, None, device), generator)
            return z[:, z.shape[1] - new:], used

        return slide_windows(window, start, total_length, context,
                             stride or self.stride or max(1, context // 2))


class AncestralSampler(MaskedSampler):
    """MDLM's ancestral sampler on the grid linspace(1, t_min, T + 1) (paper §3.2.2, eq. 7).

    Step t -> s for a masked token: z_s ~ Cat([(1 - alpha_s) m + (alpha_s - alpha_t) x_theta(z_t)]
    / (1 - alpha_t)); unmasked tokens stay. No-change cache: when no token changed in a step and
    the model is not time-conditioned, x_theta(z_t) is reused without a network call (nfe counts
    real calls); a step that starts with no MASK left calls nothing. The cache is off when
    time-conditioned (METHODS.md §6.4). Noise removal: tokens still masked at t_min are drawn by
    one more ancestral step to t = 0 (alpha_0 = 1), or set to argmax x_theta.
    """

    def __init__(self, *, steps: int = 256, use_cache: bool = True, t_min: float = 1e-5,
                 noise_removal: str = "draw", **kw) -> None:
        super().__init__(**kw)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps, self.use_cache, self.t_min, self.noise_removal = steps, use_cache, t_min, noise_removal

    def run(self, model, z, generator):
        cache_ok = self.use_cache and not self.conditioned(model)
        times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64).tolist()
        logp, nfe = None, 0
        for t, s in zip(times[:-1], times[1:]):
            if not (z == self.mask_id).any():
                break
            if logp is None or not cache_ok:
                logp, nfe = self.denoise(model, z, t), nfe + 1
            z_next = self.step(z, logp, t, s, generator)
            if not torch.equal(z_next, z):
                logp = None
            z = z_next
        if (z == self.mask_id).any():
            t = times[-1]
            if logp is None or not cache_ok:
                logp, nfe = self.denoise(model, z, t), nfe + 1
            if self.noise_removal == "argmax":
                z = torch.where(z == self.mask_id, logp.argmax(-1), z)
            else:
                z = self.step(z, logp, t, 0.0, generator)
        return z, nfe

    def step(self, z: torch.Tensor, logp: torch.Tensor, t: float, s: float, generator) -> torch.Tensor:
        """One reverse step t -> s (s < t) of eq. 7 for every masked token; (B, L) -> (B, L)."""
        # alpha_s - alpha_t = m_t - m_s and 1 - alpha_s = m_s, with m = mask_prob (accurate near 0)
        m_t, m_s = self.schedule.mask_prob(torch.tensor([t, s], dtype=torch.float64))
        log_q = logp + torch.log(m_t - m_s)  # (B, L, V)
        log_q[..., self.mask_id] = torch.log(m_s)
        draw = gumbel_argmax(log_q, generator)  # (B, L); normalising by 1 - alpha_t is not needed
        return torch.where(z == self.mask_id, draw, z)


class FirstHittingSampler(MaskedSampler):
    """First-hitting sampler (Zheng et al. 2024): exactly one token unmasks per network call.

    Given n masked tokens at time t, each one's reverse unmasking time is independent with
    P(still masked at s) = m(s)/m(t), m = mask_prob, so the first of them is hit at s with
    m(s) = m(t) u^(1/n), u ~ U(0, 1) (t_{n-1} = t_n u^(1/n) for the log-linear schedule). That
    token is a uniformly chosen masked position, drawn from x_theta(z, s). Equal in law to the
    ancestral sampler as T -> infinity. Time only matters for a time-conditioned model.
    """

    def run(self, model, z, generator):
        B = z.shape[0]
        rows = torch.arange(B, device=z.device)
        t = torch.ones(B, dtype=torch.float64, device=z.device)
        nfe = 0
        while True:
            masked = z == self.mask_id  # (B, L)
            n = masked.sum(1)
            active = n > 0
            if not active.any():
                return z, nfe
            u = torch.rand(B, dtype=torch.float64, generator=generator, device=z.device)
            p = self.schedule.mask_prob(t) * u ** (1.0 / n.clamp_min(1))
            t = torch.where(active, self.schedule.time_of(p), t)
            logp = self.denoise(model, z, t)
            nfe += 1
            score = torch.rand(masked.shape, generator=generator, device=z.device).masked_fill(~masked, -1)
            pos = score.argmax(1)  # (B,) a uniform masked position per row
            token = gumbel_argmax(logp[rows, pos], generator)  # (B,)
            z = z.clone()
            z[rows, pos] = torch.where(active, token, z[rows, pos])


class SemiAutoregressiveSampler:
    """Wraps a masked sampler so `generate` always slides a window of `context` by `stride`."""

    def __init__(self, inner: MaskedSampler, *, context: int | None = None,
                 stride: int | None = None) -> None:
        self.inner, self.context, self.stride = inner, context, stride

    def generate(self, model, n: int, length: int, *, prompt=None, generator=None,
                 template=None) -> Generation:
        if template is not None:
            return self.inner.generate(model, n, length, generator=generator, template=template)
        return self.inner.generate_long(model, n, length, context=self.context, stride=self.stride,
                                        prompt=prompt, generator=generator)
