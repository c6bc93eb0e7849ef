"""Samplers for masked diffusion (MDLM): ancestral with the no-change cache, and first-hitting.

A reverse step t -> s is two parts (docs/methods.md, MDLM):
  1. draw x_0 from the denoiser x_theta(z_t)              `draw_x0`  (EDLM replaces this part)
  2. the posterior step q(z_s | z_t, x_0): a masked token stays masked with probability
     m(s)/m(t), m = mask_prob, and otherwise becomes x_0; unmasked tokens stay   `posterior_step`
which is equal in law to the one-step categorical of MDLM eq. 7,
  z_s ~ Cat([(1 - alpha_s) m + (alpha_s - alpha_t) x_theta(z_t)] / (1 - alpha_t)).

The denoiser is the method's one network call (`method.log_x_theta`), in float64, with banned
tokens removed and temperature / top-k / nucleus filtering applied at masked positions. Categorical
draws use float64 Gumbel noise (docs/methods.md, known traps). Given tokens (prompt, template) are
never changed: SUBS carries unmasked tokens over and the posterior step only touches MASK.
"""
from __future__ import annotations

import torch

from ddlm.sampling.base import Sampler, filter_logits, gumbel_argmax, uniform
from ddlm.sampling.trace import note_step


class MaskedSampler(Sampler):
    """Shared parts: the denoiser call and the two halves of a reverse step."""

    def __init__(self, method, *, banned: tuple[int, ...] = (), **kw) -> None:
        super().__init__(method, **kw)
        self.banned = tuple(banned)  # token ids never drawn

    def denoiser(self, model, z: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """log x_theta(z_t) (B, L, V) float64 for sampling; t scalar or (B,)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])[:, None]
        at = z == self.method.mask_id
        rows = self.method.log_x_theta(model, z, t, at=at, dtype=torch.float64)  # (N, V)
        logp = self.method.fill_unmasked(rows, z, at)  # (B, L, V)
        masked = at[..., None]
        if self.banned:
            cut = logp.clone()
            cut[..., list(self.banned)] = float("-inf")
            logp = torch.where(masked, torch.log_softmax(cut, dim=-1), logp)
        if self.temperature != 1.0 or self.top_k or self.top_p < 1.0:
            logp = filter_logits(logp, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return logp

    def draw_x0(self, model, z: torch.Tensor, t: float | torch.Tensor, logp: torch.Tensor,
                generator, active: torch.Tensor | None = None) -> torch.Tensor:
        """Part 1 of a step: x_0 (B, L) drawn from the denoiser's log-probabilities logp. Only
        `active` rows (default: rows with a MASK) draw from a per-row generator."""
        if active is None:
            active = (z == self.method.mask_id).any(1)
        return gumbel_argmax(logp, generator, active=active)

    def posterior_step(self, z: torch.Tensor, x0: torch.Tensor, t: float | torch.Tensor,
                       s: float | torch.Tensor, generator) -> torch.Tensor:
        """Part 2: z_s ~ q(z_s | z_t, x_0); a MASK unmasks to x_0 with probability (m_t - m_s)/m_t.
        t, s scalars or (B,); s = 0 unmasks every token, whatever m(0) the schedule has."""
        return torch.where(self.unmasking(z, t, s, generator), x0, z)

    def step_note(self) -> dict:
        """What the recorder is told about the last step besides its tokens (EDLM: the proposals
        kept); default nothing."""
        return {}

    def spent(self, nfe: int) -> int:
        """Network evaluations so far, given the denoiser's `nfe` (EDLM adds its energy's)."""
        return nfe

    def unmasking(self, z: torch.Tensor, t: float | torch.Tensor, s: float | torch.Tensor,
                  generator) -> torch.Tensor:
        """(B, L) bool: the MASKs of z that the step t -> s unmasks, each with probability
        (m_t - m_s)/m_t independently of x_0 (s = 0: all of them)."""
        shape = (z.shape[0], 1)
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(shape[0])[:, None]
        s = torch.as_tensor(s, dtype=torch.float64, device=z.device).expand(shape[0])[:, None]
        m_t = self.method.schedule.mask_prob(t)
        # s = 0 is the data: every token clean (a schedule such as geometric has m(0) > 0)
        m_s = torch.where(s > 0, self.method.schedule.mask_prob(s), torch.zeros_like(s))
        masked = z == self.method.mask_id
        u = uniform(z.shape, generator, z.device, active=masked.any(1))
        return masked & (u * m_t >= m_s)

    def step(self, model, z: torch.Tensor, t: float, s: float, logp: torch.Tensor,
             generator) -> torch.Tensor:
        """One reverse step t -> s: part 1 (draw x_0), then part 2 (the posterior step)."""
        return self.posterior_step(z, self.draw_x0(model, z, t, logp, generator), t, s, generator)


class AncestralSampler(MaskedSampler):
    """MDLM's ancestral sampler on the grid linspace(1, t_min, T + 1) (paper §3.2.2, eq. 7).

    No-change cache: when no token changed in a step and the method is not time-conditioned,
    x_theta(z_t) is reused without a network call (nfe counts real calls); a step that starts with
    no MASK left calls nothing. The cache is off when time-conditioned (the output depends on t).
    Noise removal: tokens still masked at t_min are drawn by one more step to the data (s = 0,
    every token unmasked), or set to argmax x_theta; only masked positions change.
    """

    def __init__(self, method, *, steps: int = 256, use_cache: bool = True, t_min: float = 1e-5,
                 noise_removal: str = "draw", **kw) -> None:
        super().__init__(method, **kw)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps, self.use_cache, self.t_min, self.noise_removal = steps, use_cache, t_min, noise_removal

    def fill(self, model, z, generator):
        mask_id = self.method.mask_id
        cache_ok = self.use_cache and not self.method.time_conditioned
        times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64).tolist()
        logp, nfe = None, 0
        for t, s in zip(times[:-1], times[1:]):
            if not (z == mask_id).any():
                break
            if logp is None or not cache_ok:
                logp, nfe = self.denoiser(model, z, t), nfe + 1
            z_next = self.step(model, z, t, s, logp, generator)
            if not torch.equal(z_next, z):
                logp = None
            z = z_next
            if self.recorder is not None:  # its note costs a host read or a reset per step
                note_step(self, z, self.spent(nfe), t=s, **self.step_note())
        if (z == mask_id).any():
            t = times[-1]
            if logp is None or not cache_ok:
                logp, nfe = self.denoiser(model, z, t), nfe + 1
            if self.noise_removal == "argmax":
                z = torch.where(z == mask_id, logp.argmax(-1), z)
            else:
                z = self.step(model, z, t, 0.0, logp, generator)
            if self.recorder is not None:  # its note costs a host read or a reset per step
                note_step(self, z, self.spent(nfe), t=0.0, **self.step_note())
        return z, nfe


class FirstHittingSampler(MaskedSampler):
    """First-hitting sampler (Zheng et al. 2024): exactly one token unmasks per network call.

    Given n masked tokens at time t, each one's reverse unmasking time is independent with
    P(still masked at s) = m(s)/m(t), m = mask_prob, so the first of them is hit at s with
    m(s) = m(t) u^(1/n), u ~ U(0, 1) (t_{n-1} = t_n u^(1/n) for the log-linear schedule). That
    token is a uniformly chosen masked position, drawn from x_theta(z, s). Equal in law to the
    ancestral sampler as T -> infinity. Time only matters for a time-conditioned model. Rows are
    independent: a finished row waits while the others go on.
    """

    def fill(self, model, z, generator):
        schedule, mask_id = self.method.schedule, self.method.mask_id
        B = z.shape[0]
        rows = torch.arange(B, device=z.device)
        t = torch.ones(B, dtype=torch.float64, device=z.device)
        nfe = 0
        while True:
            masked = z == mask_id  # (B, L)
            n = masked.sum(1)
            active = n > 0
            if not active.any():
                return z, nfe
            u = uniform((B,), generator, z.device, active=active)
            t = torch.where(active, schedule.time_of(schedule.mask_prob(t) * u ** (1.0 / n.clamp_min(1))), t)
            logp = self.denoiser(model, z, t)
            nfe += 1
            score = uniform(masked.shape, generator, z.device, active=active).masked_fill(~masked, -1)
            pos = score.argmax(1)  # (B,) a uniform masked position per row
            x0 = self.draw_x0(model, z, t, logp, generator)  # (B, L)
            z = z.clone()
            z[rows, pos] = torch.where(active, x0[rows, pos], z[rows, pos])
            note_step(self, z, nfe)
