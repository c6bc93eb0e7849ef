"""Samplers of score-entropy diffusion (SEDD): Euler and analytic (Tweedie tau-leaping) steps.

Both run the reverse CTMC on the grid linspace(1, t_min, T + 1), every position updated in
parallel from one network call, then one last analytic step from t_min to sigma_bar = 0. Scores
depend on sigma_bar, so no call is ever reused (METHODS.md §2). Draws use float64 Gumbel noise.

Euler (SEDD §4.1): from x_t, jump to y != x_t with probability dt sigma(t) Q(x_t, y) s_y, else stay.
Analytic (SEDD Thm 4.2), with d = sigma_bar(t) - sigma_bar(s):
    p(x_s = y | x_t) propto [exp(-d Q) s]_y exp(d Q)(x_t, y),   s_{x_t} = 1,
exact for one position with exact scores (p_s = exp(-d Q) p_t and Bayes' rule).
Given positions (a prompt or a template) are put back after every step.
"""
from __future__ import annotations

import time

import torch

from ddlm.sampling.base import Generation, expand_rows, gumbel_argmax, model_device, slide_windows

PREDICTORS = ("analytic", "euler")


class ScoreSampler:
    """Draws from a SEDD method (its graph, schedule and score parameterisation)."""

    def __init__(self, method, *, steps: int = 256, predictor: str = "analytic", t_min: float = 1e-5,
                 temperature: float = 1.0, stride: int = 0) -> None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor={predictor!r} must be one of: {', '.join(PREDICTORS)}")
        self.method, self.steps, self.predictor, self.t_min = method, steps, predictor, t_min
        self.temperature, self.stride = temperature, stride

    def scores(self, model, z: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        """(B, L, V) float64 scores s_theta(z), with s_{z} = 1 at the current token."""
        sigma = sigma_bar.float() if self.method.time_conditioned else None
        logits = model(z, sigma=sigma, mask="bidirectional")
        s = torch.exp(self.method.log_score(logits, z, sigma_bar))
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

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 template: torch.Tensor | None = None) -> Generation:
        """(n, Lp + length) tokens; `template` (1 or n, L) fixes its non-MASK positions instead.
        Past the model's context, windows slide: each keeps the last context - stride tokens as a
        prompt and adds `stride` (default context // 2)."""
        context = getattr(getattr(model, "cfg", None), "max_len", 0)
        total = length + (0 if prompt is None else prompt.shape[-1])
        if template is None and context and total > context:
            return self.generate_long(model, n, length, context, prompt=prompt, generator=generator)
        start = time.perf_counter()
        device = model_device(model)
        mask_id = self.method.mask_id
        if template is not None:
            fixed = expand_rows(template.to(device), n, "template")
        else:
            fixed = torch.full((n, length), mask_id, dtype=torch.long, device=device)
            if prompt is not None:
                fixed = torch.cat([expand_rows(prompt.to(device), n, "prompt"), fixed], dim=1)
        given = fixed != mask_id
        z = self.method.graph.sample_base(fixed.shape, generator=generator, device=device)
        z = torch.where(given, fixed, z)
        schedule = self.method.schedule
        times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64)
        sigma_bars = schedule.total_noise(times)
        for i in range(self.steps):
            sb = sigma_bars[i].expand(n).to(device)
            s = self.scores(model, z, sb)
            if self.predictor == "euler":
                weights = self.euler_step(z, s, times[i].item(), (times[i] - times[i + 1]).item())
            else:
                weights = self.analytic_step(z, s, (sigma_bars[i] - sigma_bars[i + 1]).to(device))
            z = torch.where(given, fixed, self.draw(weights, generator))
        z = self.denoise(model, z, sigma_bars[-1].expand(n).to(device), given, fixed, generator)
        return Generation(tokens=z, nfe=self.steps + 1, seconds=time.perf_counter() - start)

    def generate_long(self, model, n: int, length: int, context: int, *, prompt=None,
                      generator=None) -> Generation:
        device = model_device(model)
        start = torch.empty((n, 0), dtype=torch.long, device=device) if prompt is None \
            else expand_rows(prompt.to(device), n, "prompt")

        def window(prefix, new):
            out = self.generate(model, n, new, prompt=prefix, generator=generator)
            return out.tokens[:, out.tokens.shape[1] - new:], out.nfe

        return slide_windows(window, start, length, context, self.stride or max(1, context // 2))

    def denoise(self, model, z, sigma_bar, given, fixed, generator) -> torch.Tensor:
        """The last analytic step from sigma_bar(t_min) to 0; MASK is never the outcome."""
        weights = self.analytic_step(z, self.scores(model, z, sigma_bar), sigma_bar[0])
        weights[..., self.method.mask_id] = 0.0
        return torch.where(given, fixed, self.draw(weights, generator))
