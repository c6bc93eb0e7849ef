"""Samplers of score-entropy diffusion (SEDD): Euler and analytic (Tweedie tau-leaping) steps.

Both run the reverse CTMC on the grid linspace(1, t_min, T + 1), every position updated in
parallel from one network call, then one last analytic step from t_min to sigma_bar = 0. Scores
depend on sigma_bar, so no call is ever reused (docs/methods.md §4.6). Draws use float64 Gumbel noise.

Euler (SEDD §4.1): from x_t, jump to y != x_t with probability dt sigma(t) Q(x_t, y) s_y, else stay.
Analytic (SEDD Thm 4.2), with d = sigma_bar(t) - sigma_bar(s):
    p(x_s = y | x_t) propto [exp(-d Q) s]_y exp(d Q)(x_t, y),   s_{x_t} = 1,
exact for one position with exact scores (p_s = exp(-d Q) p_t and Bayes' rule).
Given positions (a prompt or a template) are put back after every step.
"""
from __future__ import annotations

import torch

from ddlm.sampling.base import Sampler, gumbel_argmax
from ddlm.sampling.trace import note_step

PREDICTORS = ("analytic", "euler")


class ScoreSampler(Sampler):
    """Draws from a SEDD method (its graph, schedule and `log_score`, the one network call)."""

    def __init__(self, method, *, steps: int = 256, predictor: str = "analytic", t_min: float = 1e-5,
                 **kw) -> None:
        super().__init__(method, **kw)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor={predictor!r} must be one of: {', '.join(PREDICTORS)}")
        self.steps, self.predictor, self.t_min = steps, predictor, t_min

    def scores(self, model, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, L, V) float64 scores s_theta(z, t), with s_{z} = 1 at the current token; t (B,)."""
        s = torch.exp(self.method.log_score(model, z, t[:, None], dtype=torch.float64))
        return s.scatter(-1, z[..., None], 1.0)

    def draw(self, weights: torch.Tensor, generator) -> torch.Tensor:
        """A categorical draw from unnormalised non-negative weights (..., V)."""
        logp = torch.log(weights.clamp_min(0.0))
        if self.temperature != 1.0:
            logp = logp / self.temperature
        return gumbel_argmax(logp, generator)

    def euler_step(self, z, s, t: float, dt: float) -> torch.Tensor:
        schedule, graph = self.method.schedule, self.method.graph
        rate = schedule.rate(torch.tensor(t, dtype=torch.float64)).item()
        jump = dt * rate * graph.rate_into(z) * s  # (B, L, V), 0 at y = z
        stay = (1.0 - jump.sum(-1)).clamp_min(0.0)
        return jump.scatter(-1, z[..., None], stay[..., None])

    def analytic_step(self, z, s, d: torch.Tensor) -> torch.Tensor:
        graph = self.method.graph
        d = d.expand(z.shape)
        return graph.exp_apply(s, -d) * graph.exp_into(z, d)

    def fill(self, model, fixed, generator):
        """Positions of `fixed` (n, L) that are MASK are generated from the base distribution;
        the others are given and put back after every step."""
        n, device = fixed.shape[0], fixed.device
        given = fixed != self.method.mask_id
        z = torch.where(given, fixed, self.method.graph.sample_base(fixed.shape, generator=generator,
                                                                    device=device))
        times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64)
        sigma_bars = self.method.schedule.total_noise(times)
        for i in range(self.steps):
            s = self.scores(model, z, times[i].expand(n).to(device))
            if self.predictor == "euler":
                weights = self.euler_step(z, s, times[i].item(), (times[i] - times[i + 1]).item())
            else:
                weights = self.analytic_step(z, s, (sigma_bars[i] - sigma_bars[i + 1]).to(device))
            z = torch.where(given, fixed, self.draw(weights, generator))
            if self.recorder is not None:  # its note costs a host read or a reset per step
                note_step(self, z, i + 1, t=times[i + 1].item())
        z = self.denoise(model, z, times[-1].expand(n).to(device), sigma_bars[-1].to(device), given,
                         fixed, generator)
        note_step(self, z, self.steps + 1, t=0.0)
        return z, self.steps + 1

    def denoise(self, model, z, t, sigma_bar, given, fixed, generator) -> torch.Tensor:
        """The last analytic step from sigma_bar(t_min) to 0; MASK is never the outcome."""
        weights = self.analytic_step(z, self.scores(model, z, t), sigma_bar)
        weights[..., self.method.mask_id] = 0.0
        return torch.where(given, fixed, self.draw(weights, generator))
