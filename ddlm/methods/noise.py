"""What every diffusion method shares: noise-schedule options and the training-time sampler.

Time sampling (MDLM code): low-discrepancy u_b = (u + b/B) mod 1 over the batch, then
t = sampling_eps + (1 - sampling_eps) u, so the estimator averages its integrand over [eps, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import MethodConfig
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
