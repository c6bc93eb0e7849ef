"""Confidence-parallel decoding (Fast-dLLM's threshold rule; Wu et al. 2025, "Fast-dLLM", §3.3;
docs/samplers.md).

Each step is one network call. x_0 is drawn at every masked position from the denoiser
(`draw_x0`: float64 Gumbel, so temperature / top-k / top-p apply), and each position's confidence
is the probability, under that same (filtered) distribution, of the token drawn there. The step
decodes every masked position whose confidence is >= threshold, and always the single most
confident one of each row that still has a MASK, so a row finishes in at most as many steps as it
has MASKs; the other masked positions stay MASK (their draws are discarded). threshold = 1.0 means
exactly one token a step, in confidence order.

Confidence is the probability of the drawn token, not the row's top probability: with greedy
decoding (Fast-dLLM's default, temperature 0) the two are the same; with sampling, Fast-dLLM
(following LLaDA's code) also scores the drawn token, under the unscaled softmax. Here it is scored
under the distribution it was drawn from, so a token is only committed when the draw itself is
likely.

This is a documented exception to the two-part step: there is no posterior q(z_s | z_t, x_0) and
no time grid. `steps` (`--steps`) is only a cap: if MASKs remain after `steps` calls, the last
call decodes all of them. NFE = the steps taken, at most the number of MASKs of the fullest row.
A time-conditioned network is given, per row, the time whose mask_prob equals the row's share of
MASKs among the positions being filled. Given tokens are never changed.
"""
from __future__ import annotations

import torch

from ddlm.sampling.ancestral import MaskedSampler
from ddlm.sampling.trace import note_step


class ConfidenceSampler(MaskedSampler):
    """Decode every masked token whose drawn token has probability >= threshold (at least one a
    step); see the module docstring."""

    def __init__(self, method, *, threshold: float = 0.9, steps: int = 256, t_min: float = 1e-5, **kw) -> None:
        super().__init__(method, **kw)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.threshold, self.steps, self.t_min = threshold, steps, t_min

    def time_of_rows(self, masked: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        """(B,) float64 times whose mask_prob is each row's share of MASKs (of `width` positions)."""
        share = masked.sum(1).double() / width.clamp_min(1)
        sched = self.method.schedule
        lo, hi = (float(sched.mask_prob(torch.tensor(v, dtype=torch.float64))) for v in (self.t_min, 1.0))
        return sched.time_of(share.clamp(lo, hi)).clamp(self.t_min, 1.0)

    def choose(self, masked: torch.Tensor, confidence: torch.Tensor, last: bool) -> torch.Tensor:
        """(B, L) bool: the masked positions decoded this step. confidence (B, L) float64 is -1
        where not masked."""
        top = confidence.argmax(1)  # (B,) the most confident masked position of each row
        pick = torch.zeros_like(masked)
        pick[torch.arange(masked.shape[0], device=masked.device), top] = True
        pick &= masked
        if last:
            return masked
        if self.threshold < 1:
            pick |= masked & (confidence >= self.threshold)
        return pick

    def fill(self, model, z, generator):
        mask_id = self.method.mask_id
        masked = z == mask_id
        width = masked.sum(1)
        nfe = 0
        while masked.any():
            logp = self.denoiser(model, z, self.time_of_rows(masked, width))
            nfe += 1
            x0 = self.draw_x0(model, z, None, logp, generator)  # (B, L)
            drawn = logp.gather(-1, x0[..., None]).squeeze(-1).exp()  # (B, L) p(x0_l)
            confidence = torch.where(masked, drawn, torch.full_like(drawn, -1.0))
            z = torch.where(self.choose(masked, confidence, nfe >= self.steps), x0, z)
            masked = z == mask_id
            note_step(self, z, nfe)
        return z, nfe
