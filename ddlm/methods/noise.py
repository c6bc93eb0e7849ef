"""What every diffusion method shares: noise-schedule options, time sampling, and the loss and
Monte-Carlo bound built from one sampled-time term.

Time sampling (MDLM code): low-discrepancy u_b = (u + b/B) mod 1 over the batch, then
t = sampling_eps + (1 - sampling_eps) u, so the estimator averages its integrand over [eps, 1].

Times are per position everywhere a method, its loss, its bound and the backbone see them: t may be
(B,) (one per sequence), (B, K) with K dividing L (one per block of L/K positions) or (B, L);
`time_per_position` turns any of these into (B, 1) or (B, L), which broadcast against (B, L).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, Method, MethodConfig, NLLBound, counted_weights
from ddlm.nn.transformer import positions_of
from ddlm.process.schedules import SCHEDULES, Schedule, build_schedule


@dataclass
class NoiseConfig(MethodConfig):
    """Schedule and time-sampling options of a diffusion method (`--<method>.<field>=value`)."""

    schedule: str = "loglinear"
    """Noise schedule: loglinear | cosine | linear | geometric."""
    eps: float = 1e-3
    """Schedule floor: alpha(1) = eps for loglinear, cosine and linear (mask rate reaches 1 - eps)."""
    sigma_min: float = 1e-4
    """Geometric schedule only: sigma_bar(0)."""
    sigma_max: float = 20.0
    """Geometric schedule only: sigma_bar(1)."""
    sampling_eps: float = 1e-3
    """Training/eval times are t = sampling_eps + (1 - sampling_eps) u, u ~ U[0, 1)."""
    antithetic: bool = True
    """Low-discrepancy times u_b = (u + b/B) mod 1 across the batch (False: i.i.d.)."""

    def check_all(self, name: str, checks: list[tuple[bool, str]]) -> None:
        """Raise ConfigError for the first failed check, after the noise options' own."""
        noise = [
            (self.schedule in SCHEDULES,
             f"{name}.schedule={self.schedule!r} must be one of: {', '.join(SCHEDULES)}"),
            (0 < self.eps < 1, f"{name}.eps={self.eps} must be in (0, 1)"),
            (0 < self.sigma_min < self.sigma_max,
             f"{name}.sigma_min={self.sigma_min}, sigma_max={self.sigma_max} need 0 < min < max"),
            (0 <= self.sampling_eps < 1, f"{name}.sampling_eps={self.sampling_eps} must be in [0, 1)"),
        ]
        for ok, message in noise + checks:
            if not ok:
                raise ConfigError(message)

    def build_schedule(self) -> Schedule:
        """The Schedule named by `schedule`, with its options."""
        if self.schedule == "geometric":
            return build_schedule("geometric", sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        return build_schedule(self.schedule, eps=self.eps)


def time_per_position(t: torch.Tensor, length: int) -> torch.Tensor:
    """t of shape (B,), (B, K) with K | L, or (B, L) -> (B, 1) or (B, L), same dtype."""
    return positions_of(t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1), length)


def stratified_uniform(n: int, *, antithetic: bool, generator=None, device=None) -> torch.Tensor:
    """(n,) float64 in [0, 1): u_b = (u + b/n) mod 1 with one u (antithetic) or n i.i.d. draws."""
    if not antithetic:
        return torch.rand(n, dtype=torch.float64, generator=generator, device=device)
    u = torch.rand(1, dtype=torch.float64, generator=generator, device=device)
    return torch.remainder(u + torch.arange(n, dtype=torch.float64, device=device) / n, 1.0)


def sample_times(cfg: NoiseConfig, n: int, *, generator=None, device=None) -> torch.Tensor:
    """(n,) float64 training/evaluation times in [sampling_eps, 1]."""
    u = stratified_uniform(n, antithetic=cfg.antithetic, generator=generator, device=device)
    return cfg.sampling_eps + (1 - cfg.sampling_eps) * u


def keep_given(x0: torch.Tensor, xt: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """x_t (B, L) with the `given` positions (B, L) bool reset to x0: a context never corrupted."""
    return xt if given is None else torch.where(given, x0, xt)


class DiffusionMethod(Method):
    """Base of MDLM and SEDD. A subclass defines `sampled_nll`, the (B, L) bound integrand at times
    t (B, 1) or (B, L) with x_t drawn inside, and `prior_nll`, the bound's prior term."""

    attention = "bidirectional"
    default_block = "gated"

    def __init__(self, cfg, *, vocab_size: int, mask_id: int, bos_id: int, pad_id: int,
                 context: int = 0) -> None:
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id, bos_id=bos_id, pad_id=pad_id,
                         context=context)
        cfg.validate()
        self.schedule: Schedule = cfg.build_schedule()

    @property
    def time_conditioned(self) -> bool:
        return self.cfg.time_conditioning

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """(n,) float64 times in [sampling_eps, 1]."""
        return sample_times(self.cfg, n, generator=generator, device=device)

    def snap_t(self, t: torch.Tensor) -> torch.Tensor:
        """An injected t as float64."""
        return t.to(torch.float64)

    def training_times(self, batch: int, length: int, *, generator=None, device=None) -> torch.Tensor:
        """Times of one training batch: (B,) here, one per sequence; (B, K) for a method with one
        time per block."""
        return self.sample_t(batch, generator=generator, device=device)

    def eval_times(self, batch: int, length: int, n_samples: int, *, generator=None,
                   device=None) -> torch.Tensor:
        """(n_samples, B, 1 or K) times of the bound, stratified jointly: sample j of sequence b
        gets u_{jB+b}, so each sequence's n times are also spread over [0, 1)."""
        return self.sample_t(batch * n_samples, generator=generator, device=device).view(n_samples, batch, 1)

    def sampled_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None, *,
                    dtype: torch.dtype = torch.float64, given: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) integrand at x_t drawn inside, the `given` positions kept clean (`keep_given`)."""
        raise NotImplementedError

    def prior_nll(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) float64 prior term of the bound."""
        raise NotImplementedError

    def loss(self, model, x0, *, t=None, loss_mask=None, generator=None) -> LossOutput:
        """Bound estimate (float32, without the constant prior term); loss = sum(token_nll) /
        counted tokens. t injectable: (B,), (B, K) or (B, L) (default: one stratified t per
        sequence); loss_mask (B, L) selects the counted tokens (default: all); every token is
        corrupted."""
        t = self.training_times(*x0.shape, generator=generator, device=x0.device) if t is None \
            else self.snap_t(t.to(x0.device))
        t = time_per_position(t, x0.shape[1])
        nll = self.sampled_nll(model, x0, t, generator, dtype=torch.float32)
        weights = torch.ones_like(nll) if loss_mask is None else loss_mask.to(nll.dtype)
        nll = nll * weights
        return LossOutput(loss=nll.sum() / weights.sum().clamp_min(1), token_nll=nll, weights=weights)

    @torch.no_grad()
    def nll_bound(self, model, x0, *, n_samples=1, loss_mask=None, given=None, generator=None) -> NLLBound:
        """Per-sequence bound in nats (float64), averaged over n_samples draws of (t, x_t), plus
        the prior term.

        Protocol: one t per sequence (or per block) per sample, from `eval_times`;
        log-probabilities in float64. Counted tokens: loss_mask, default all L tokens (the
        AR rule, so both count the same tokens; pass loss_mask = x0 != pad for padded data). `nll`
        is the mean over samples, so a standard error can be taken across sequences.

        Conditional bound: positions `given` (B, L) bool are clean in every x_t and not counted
        (integrand and prior), so `nll` bounds -log p(x0 elsewhere | x0 at given): the forward
        process runs on the other positions only, and the denoiser reads the context clean.
        """
        B, L = x0.shape
        t_all = self.eval_times(B, L, n_samples, generator=generator, device=x0.device)
        weights = counted_weights(x0, loss_mask, given)
        total = torch.zeros(B, dtype=torch.float64, device=x0.device)
        for t in t_all:
            total += (self.sampled_nll(model, x0, time_per_position(t, L), generator, given=given) * weights).sum(1)
        prior = (self.prior_nll(x0) * weights).sum(1)
        return NLLBound(nll=total / n_samples + prior, tokens=weights.sum(1), exact=False)
