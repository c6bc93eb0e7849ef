"""Noise schedules of masked (absorbing) diffusion, one class each.

A schedule maps time t in [0, 1] to the total noise sigma_bar(t) = int_0^t sigma(s) ds, and
everything else follows from it (MDLM, Sahoo et al. 2024, §3.1 and eq. 11):

    alpha(t)     = exp(-sigma_bar(t))                    probability a token is still clean
    mask_prob(t) = 1 - alpha(t) = -expm1(-sigma_bar(t))  probability a token is masked
    rate(t)      = d sigma_bar / dt = sigma(t)
    weight(t)    = -alpha'(t) / (1 - alpha(t)) = sigma(t) / expm1(sigma_bar(t))

`weight` is the NELBO weight of MDLM eq. 11 (1/t for the log-linear schedule); computing it as
rate / expm1(sigma_bar) keeps it accurate for small sigma_bar and lets it go to 0 (not nan) when
sigma_bar is large. `time_of(p)` inverts mask_prob; the first-hitting sampler needs it.

Tensors in, tensors out (any float dtype, any shape); float64 inputs give float64 results.
"""
from __future__ import annotations

import math

import torch

from ddlm.errors import ConfigError


class Schedule:
    """Base class: subclasses define `total_noise` and `rate`, and `time_of` where it is closed-form."""

    name = ""

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_bar(t)."""
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = d sigma_bar / dt."""
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = exp(-sigma_bar(t)): the chance a token is still clean at time t."""
        return torch.exp(-self.total_noise(t))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t, computed with expm1 so it is exact for small sigma_bar."""
        return -torch.expm1(-self.total_noise(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_t / (1 - alpha_t) = sigma(t) / expm1(sigma_bar(t)) (MDLM eq. 11)."""
        return self.rate(t) / torch.expm1(self.total_noise(t))

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        """The t with mask_prob(t) = p; bisection here (mask_prob increases in t)."""
        lo, hi = torch.zeros_like(p), torch.ones_like(p)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.mask_prob(mid) < p
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LogLinear(Schedule):
    """sigma_bar(t) = -log(1 - (1-eps) t): the mask rate (1-eps) t is linear in time.

    MDLM's default (its code's LogLinearNoise). alpha_t = 1 - (1-eps) t, so weight(t) = (1-eps) /
    (1 - alpha_t) = 1/t and alpha(1) = eps keeps sigma_bar(1) = -log eps finite.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def total_noise(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def mask_prob(self, t):
        return (1 - self.eps) * t

    def weight(self, t):
        return 1 / t

    def time_of(self, p):
        return p / (1 - self.eps)


class Cosine(Schedule):
    """alpha_t = eps + (1-eps) cos(pi t / 2), i.e. sigma_bar(t) = -log(eps + (1-eps) cos(pi t/2)).

    MDLM's CosineNoise; alpha(0) = 1, alpha(1) = eps. Masks slowly at first and fast near t = 1.
    """

    name = "cosine"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def _cos(self, t):
        return torch.cos(t * (math.pi / 2))

    def total_noise(self, t):
        return -torch.log(self.eps + (1 - self.eps) * self._cos(t))

    def rate(self, t):
        slope = (1 - self.eps) * torch.sin(t * (math.pi / 2)) * (math.pi / 2)  # -alpha'_t
        return slope / (self.eps + (1 - self.eps) * self._cos(t))

    def mask_prob(self, t):
        # 1 - cos(x) = 2 sin^2(x/2), exact near t = 0
        return (1 - self.eps) * 2 * torch.sin(t * (math.pi / 4)) ** 2

    def weight(self, t):
        slope = (1 - self.eps) * torch.sin(t * (math.pi / 2)) * (math.pi / 2)
        return slope / self.mask_prob(t)

    def time_of(self, p):
        return (4 / math.pi) * torch.asin(torch.sqrt(p / (2 * (1 - self.eps))).clamp(max=1.0))


class Linear(Schedule):
    """sigma_bar(t) = sigma_max t: total noise linear in time, alpha_t = exp(-sigma_max t).

    The default sigma_max = -log(eps) clips the schedule so that alpha(1) = eps exactly and
    sigma_bar stays finite. (alpha_t = 1 - t with the eps clip is the LogLinear schedule; this class
    is the distinct "linear" of MDLM's code and schedule ablation: linear in sigma_bar, not in alpha.)
    """

    name = "linear"

    def __init__(self, eps: float = 1e-3, sigma_max: float | None = None) -> None:
        self.eps = eps
        self.sigma_max = -math.log(eps) if sigma_max is None else sigma_max

    def total_noise(self, t):
        return self.sigma_max * t

    def rate(self, t):
        return torch.full_like(t, self.sigma_max)

    def time_of(self, p):
        return -torch.log1p(-p) / self.sigma_max


class Geometric(Schedule):
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (SEDD's geometric noise; Lou et al. 2024).

    rate(t) = sigma_bar(t) log(sigma_max / sigma_min). alpha(0) = exp(-sigma_min) is not exactly 1:
    a fraction ~sigma_min of tokens is already masked at t = 0.
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total_noise(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def rate(self, t):
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)

    def time_of(self, p):
        sigma_bar = -torch.log1p(-p)
        t = torch.log(sigma_bar / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(0.0, 1.0)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LogLinear, Cosine, Linear, Geometric)}


def build_schedule(name: str, **kw) -> Schedule:
    """A schedule by name ('loglinear', 'cosine', 'linear', 'geometric') with its keyword options."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    try:
        return SCHEDULES[name](**kw)
    except TypeError:
        raise ConfigError(f"noise schedule {name!r} does not take options {sorted(kw)}") from None
