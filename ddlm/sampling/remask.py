"""ReMDM: masked diffusion sampling that may remask decoded tokens (Wang et al. 2025, "Remasking
Discrete Diffusion Models with Inference-Time Scaling", §3 and §4.1; docs/samplers.md).

With alpha = 1 - m the clean fraction (m = mask_prob), a step t -> s (s < t) draws x_0 from the
denoiser (`draw_x0`, as MDLM) and then takes ReMDM's posterior step (paper eq. 5), position by
position:
    z_t decoded:  z_s = MASK with probability sigma_t, else z_s = z_t (= x_0 by SUBS)
    z_t = MASK:   z_s = x_0  with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)
                  z_s = MASK with probability (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t)
for any 0 <= sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t) (sigma_max = 1 at alpha_t = 0).
Every such sigma keeps q(z_s | x_0) = MDLM's marginal, so with the exact denoiser and one change a
step the samples are the data's law; sigma_t = 0 is MDLM's posterior (the ancestral sampler, which
this sampler then equals draw for draw). Schedules (`remask`, paper §4.1):
    cap       sigma_t = min(eta, (1 - alpha_s) / alpha_t)          ("max-capped", eta = eta_cap)
    rescale   sigma_t = eta * sigma_max                            (eta = eta_rescale)
    conf      sigma_t^l = softmax_l(-psi^l) * sigma_max over the decoded, not given, positions l,
              psi^l = the probability the token had when it was decoded; MASK positions use
              sigma = 0 (MDLM's unmasking), as the reference code does. No eta. Not
              marginal-preserving: a heuristic that remasks the least confident tokens first.
    loop      the clean fraction follows alpha(t) = alpha_on (1 - t) / (1 - t_on) for t > t_on (MDLM),
              alpha = alpha_on for t_off < t <= t_on with sigma_t = min(eta, sigma_max) (ReMDM at a fixed
              level: unmask probability eta alpha_on / (1 - alpha_on)), and
              1 - alpha(t) = (1 - alpha_on) t / t_off for t <= t_off (MDLM). A time-conditioned network
              is given the time whose mask_prob equals the loop's level 1 - alpha(t).
The grid, the noise-removal step at t_min and the no-change cache are the ancestral sampler's; a
step that remasks changes z, so the cache is cleared after it like after any change. Once no MASK
is left the steps go on (they may remask) without a network call. Given tokens (prompt, template)
are never remasked: only positions that were MASK when `fill` began can go back to MASK.
"""
from __future__ import annotations

import torch

from ddlm.sampling.ancestral import AncestralSampler
from ddlm.sampling.base import uniform
from ddlm.sampling.trace import note_step

SCHEDULES = ("cap", "rescale", "conf", "loop")


class RemaskingSampler(AncestralSampler):
    """ReMDM on the ancestral sampler's grid linspace(1, t_min, T + 1); see the module docstring."""

    def __init__(self, method, *, remask: str = "cap", eta: float = 0.02, t_on: float = 0.55,
                 t_off: float = 0.05, alpha_on: float = 0.9, **kw) -> None:
        super().__init__(method, **kw)
        if remask not in SCHEDULES:
            raise ValueError(f"remask={remask!r} must be one of {', '.join(SCHEDULES)}")
        if not 0 <= eta <= 1 or not 0 <= t_off < t_on <= 1 or not 0 < alpha_on < 1:
            raise ValueError(f"need 0 <= eta={eta} <= 1, 0 <= t_off={t_off} < t_on={t_on} <= 1, "
                             f"0 < alpha_on={alpha_on} < 1")
        self.remask, self.eta, self.t_on, self.t_off, self.alpha_on = remask, eta, t_on, t_off, alpha_on

    @property
    def silent(self) -> bool:
        """True when the schedule never remasks (then this is the ancestral sampler)."""
        return self.eta == 0 and self.remask != "conf"

    # ---- levels and sigma ----------------------------------------------------------------------

    def level(self, t: torch.Tensor) -> torch.Tensor:
        """m = 1 - alpha at times t (B, 1) float64: the method's schedule, or the loop's levels;
        0 at t = 0 (every token clean)."""
        if self.remask != "loop":
            return torch.where(t > 0, self.method.schedule.mask_prob(t), torch.zeros_like(t))
        hold = 1 - self.alpha_on
        early = 1 - (1 - t) * self.alpha_on / (1 - self.t_on)
        late = t * hold / self.t_off if self.t_off > 0 else torch.zeros_like(t)
        return torch.where(t > self.t_on, early, torch.where(t > self.t_off, torch.full_like(t, hold), late))

    def network_time(self, t: float, m_t: torch.Tensor) -> torch.Tensor | float:
        """The time the network sees: t, or for the loop the time whose mask_prob is its level."""
        if self.remask != "loop":
            return t
        sched = self.method.schedule
        lo, hi = (sched.mask_prob(torch.tensor(v, dtype=torch.float64)) for v in (self.t_min, 1.0))
        return sched.time_of(m_t[:, 0].clamp(float(lo), float(hi))).clamp(self.t_min, 1.0)

    def sigma(self, m_t: torch.Tensor, m_s: torch.Tensor, t: float, s: float, psi: torch.Tensor,
              decoded: torch.Tensor) -> torch.Tensor:
        """(B, L) float64 sigma_t of each position for the step t -> s: a decoded token is remasked
        with this probability, and a MASK unmasks with the sigma alpha_t term of eq. 5 (conf: the
        weights of the decoded positions, 0 at MASKs)."""
        a_t = 1 - m_t
        sigma_max = torch.where(a_t > 0, (m_s / a_t.clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(a_t))
        if self.remask == "cap":
            sig = sigma_max.clamp(max=self.eta)
        elif self.remask == "rescale":
            sig = self.eta * sigma_max
        elif self.remask == "loop":
            inside = self.t_off < s and t <= self.t_on
            sig = sigma_max.clamp(max=self.eta) if inside else torch.zeros_like(sigma_max)
        else:  # conf: softmax of -psi over the decoded positions
            weight = torch.softmax((-psi).masked_fill(~decoded, float("-inf")), dim=1)
            return torch.nan_to_num(weight, nan=0.0) * sigma_max * decoded
        return sig.expand_as(psi)

    # ---- the step --------------------------------------------------------------------------------

    def remask_step(self, z: torch.Tensor, x0: torch.Tensor | None, m_t: torch.Tensor,
                    m_s: torch.Tensor, sig: torch.Tensor, decoded: torch.Tensor,
                    generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ReMDM's posterior step (eq. 5): returns (z_s, unmasked, remasked). A MASK unmasks iff
        u m_t >= m_s - sigma alpha_t (probability (m_t - m_s + sigma alpha_t) / m_t; with
        sigma = 0 exactly the ancestral sampler's test); a decoded token is remasked iff r < sigma.
        Uniforms for remasking are drawn only when some sigma is positive."""
        masked = z == self.method.mask_id
        unmask = torch.zeros_like(masked)
        if x0 is not None:
            u = uniform(z.shape, generator, z.device, active=masked.any(1))
            unmask = masked & (u * m_t >= m_s - sig * (1 - m_t))
        remasked = torch.zeros_like(masked)
        if bool((sig * decoded > 0).any()):
            r = uniform(z.shape, generator, z.device, active=decoded.any(1))
            remasked = decoded & (r < sig)
        z_s = torch.where(unmask, x0 if x0 is not None else z, z).masked_fill(remasked, self.method.mask_id)
        return z_s, unmask, remasked

    def fill(self, model, z, generator):
        mask_id = self.method.mask_id
        generated = z == mask_id  # only these may ever be remasked
        cache_ok = self.use_cache and not self.method.time_conditioned
        psi = torch.zeros(z.shape, dtype=torch.float64, device=z.device)  # confidence when decoded
        times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64).tolist()
        rows = (z.shape[0], 1)
        logp, nfe = None, 0
        for t, s in zip(times[:-1], times[1:]):
            masked = z == mask_id
            any_masked = bool(masked.any())  # one host read a step
            if not any_masked and self.silent:
                break
            m_t = self.level(torch.full(rows, t, dtype=torch.float64, device=z.device))
            m_s = self.level(torch.full(rows, s, dtype=torch.float64, device=z.device))
            x0 = None
            if any_masked:
                if logp is None or not cache_ok:
                    logp, nfe = self.denoiser(model, z, self.network_time(t, m_t)), nfe + 1
                x0 = self.draw_x0(model, z, t, logp, generator)
            decoded = generated & ~masked
            sig = self.sigma(m_t, m_s, t, s, psi, decoded)
            z_next, unmasked, remasked = self.remask_step(z, x0, m_t, m_s, sig, decoded, generator)
            if x0 is not None:  # (no host read: where() keeps psi wherever nothing unmasked)
                psi = torch.where(unmasked, logp.gather(-1, x0[..., None]).squeeze(-1).exp(), psi)
            if not torch.equal(z_next, z):
                logp = None
            z = z_next
            if self.recorder is not None:  # its note costs a host read or a reset per step
                note_step(self, z, self.spent(nfe), t=s, remasked=int(remasked.sum()))
        if (z == mask_id).any():  # noise removal, as the ancestral sampler
            t = times[-1]
            m_t = self.level(torch.full(rows, t, dtype=torch.float64, device=z.device))
            if logp is None or not cache_ok:
                logp, nfe = self.denoiser(model, z, self.network_time(t, m_t)), nfe + 1
            if self.noise_removal == "argmax":
                z = torch.where(z == mask_id, logp.argmax(-1), z)
            else:
                z = self.step(model, z, t, 0.0, logp, generator)
            note_step(self, z, self.spent(nfe), t=0.0)
        return z, nfe
