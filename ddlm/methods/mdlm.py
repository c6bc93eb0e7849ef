"""MDLM: masked (absorbing) diffusion with the SUBS parameterisation (Sahoo et al. 2024).

Forward process (paper §3.1): every token is masked independently,
    q(z_t | x) = Cat(z_t; alpha_t x + (1 - alpha_t) m),      alpha_t = exp(-sigma_bar(t)).

SUBS parameterisation (paper §3.2.3), applied here to the backbone's plain logits:
    (1) zero masking probability: the MASK logit is -inf before the log-softmax;
    (2) carry-over unmasking: an unmasked position of z_t is copied, x_theta(z_t)_l = z_t,l,
        so it contributes exactly zero loss.
PAD is an ordinary symbol here (padded corpora need it predicted, as MDLM does on LM1B); callers
leave pad tokens out of the loss with `loss_mask`.

Continuous-time NELBO (paper eq. 11), per sequence:
    L_inf = E_{t ~ U[0,1]} E_{z_t ~ q} [ w(t) sum_{l: z_t,l = m} -log x_theta(z_t)_l[x_l] ],
    w(t) = -alpha'_t / (1 - alpha_t)  (= 1/t for the log-linear schedule).
Discrete-time NELBO with T steps (paper eq. 10), t(i) = i/T, s(i) = (i-1)/T:
    L_T = sum_{i=1..T} E_q [ (alpha_s - alpha_t)/(1 - alpha_t) sum_masked -log x_theta(z_t)[x] ],
estimated by drawing i uniformly and multiplying by T. L_T decreases to L_inf as T grows.

The bound adds the prior term KL(q(z_1 | x) || p_base) per token, with the absorbing graph's base
p_base = (1 - alpha_1) MASK + alpha_1 Uniform(V - 1 tokens): alpha_1 log(V - 1), as SEDD's absorbing
bound (docs/methods.md). Times are drawn by ddlm/methods/noise.py (low-discrepancy over the batch,
in [sampling_eps, 1]) and may be per position.

Clipped training window (BD3-LM, Arriola et al. 2025, §4; MDLM is BD3-LM with one block): training
times may be drawn from t ~ U[beta, omega], the weight w(t) unchanged, which lowers the variance of
the loss at the price of a biased training objective. With `search_every`, the window whose
per-sequence loss has the lowest variance on held-out batches is chosen every N steps (`adapt`).
Evaluation ignores the window: `nll_bound` always draws t from the full [sampling_eps, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddlm.methods.base import register
from ddlm.methods.noise import DiffusionMethod, NoiseConfig, keep_given, stratified_uniform, time_per_position


@dataclass
class MDLMConfig(NoiseConfig):
    """Options of MDLM (`--mdlm.<field>=value`); sampling options live in `--sample.*`."""

    time_conditioning: bool = False
    """Give the backbone sigma_bar(t) (adaLN). Disables the sampler's no-change cache."""
    discrete_steps: int = 0
    """0: continuous-time NELBO (eq. 11); T > 0: the discrete T-step NELBO (eq. 10)."""
    clip_min: float = 0.0
    """Training times t ~ U[max(clip_min, sampling_eps), clip_max] (BD3-LM's clipped window; per
    block for BD3-LM, where 1 = every token of the block masked). Evaluation uses the full window."""
    clip_max: float = 1.0
    """Upper end of the training-time window."""
    search_every: int = 0
    """Every N training steps, choose the window with the lowest loss variance (0: keep it fixed)."""
    search_batches: int = 4
    """Held-out batches the window search scores."""
    search_draws: int = 8
    """Times the search draws per held-out sequence (per block for BD3-LM), stratified over the
    full window; a candidate window's variance is over the draws that fall inside it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_all("mdlm", [
            (self.discrete_steps >= 0, f"mdlm.discrete_steps={self.discrete_steps} must be >= 0"),
            *self.window_checks("mdlm"),
        ])

    def window_checks(self, name: str) -> list[tuple[bool, str]]:
        """The checks of the clipped-window options, named after the method's section."""
        return [
            (0.0 <= self.clip_min <= self.clip_max <= 1.0,
             f"{name}.clip_min={self.clip_min}, clip_max={self.clip_max} need 0 <= min <= max <= 1"),
            (self.search_every >= 0, f"{name}.search_every={self.search_every} must be >= 0"),
            (self.search_batches >= 1, f"{name}.search_batches={self.search_batches} must be >= 1"),
            (self.search_draws >= 1, f"{name}.search_draws={self.search_draws} must be >= 1"),
            (self.discrete_steps == 0 or ((self.clip_min, self.clip_max) == (0.0, 1.0) and not self.search_every),
             f"{name}.discrete_steps works only with the full window ({name}.clip_min=0, clip_max=1, no search)"),
        ]

    @property
    def full_window(self) -> bool:
        """Whether training draws times from the whole [sampling_eps, 1] and never searches."""
        return (self.clip_min, self.clip_max) == (0.0, 1.0) and not self.search_every


FULL_MASK = 1.0  # the window (1, 1): every token of a block masked, weight 1 (the AR loss when L' = 1)


def window_grid(block_size: int = 0) -> list[tuple[float, float]]:
    """Candidate windows of the search (BD3-LM §4): widths 0.5..0.9 in steps of 0.05, starts
    0..1-w in steps of 0.05; for blocks of one token (L' = 1) also the full-mask window (1, 1)."""
    out = []
    for w in range(50, 95, 5):
        out += [(s / 100, (s + w) / 100) for s in range(0, 100 - w + 1, 5)]
    return out + ([(FULL_MASK, FULL_MASK)] if block_size == 1 else [])


def masked_log_softmax(logits: torch.Tensor, mask_id: int, *,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SUBS at a MASK position (paper §3.2.3, zero masking probability): the log-softmax of the
    logits (..., V) with the MASK column at -inf, in `dtype` (at least float32: logits are upcast)."""
    logits = logits.to(torch.promote_types(logits.dtype, dtype)).clone()
    logits[..., mask_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def carried_over(z: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """SUBS at an unmasked position (carry-over unmasking): (B, L, V) the log of a one-hot on z's
    own token."""
    out = torch.full((*z.shape, vocab), float("-inf"), dtype=dtype, device=z.device)
    return out.scatter_(-1, z[..., None], 0.0)


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int, *,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SUBS (paper §3.2.3): logits (B, L, V) and z_t (B, L) -> log x_theta(z_t) (B, L, V).

    Computed in `dtype` (at least float32: logits are upcast before the log-softmax). The MASK
    column is -inf everywhere; an unmasked position is the log of a one-hot on its own token.
    """
    logp = masked_log_softmax(logits, mask_id, dtype=dtype)  # (B, L, V)
    return torch.where((z != mask_id)[..., None], carried_over(z, logp.shape[-1], logp.dtype), logp)


def subs_at(logits: torch.Tensor, z: torch.Tensor, at: torch.Tensor | None, mask_id: int, *,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SUBS of a network's logits: (B, L, V) for every position of z_t (B, L), or (N, V) for the
    MASK positions `at` (B, L) marks (it must mark only MASK positions). A model may return every
    position even when asked for some (exact test models, wrappers); they are selected here."""
    if at is None:
        return subs_log_probs(logits, z, mask_id, dtype=dtype)
    return masked_log_softmax(logits[at] if logits.dim() == 3 else logits, mask_id, dtype=dtype)


@register
class MDLM(DiffusionMethod):
    name = "mdlm"
    config_class = MDLMConfig
    bound_name = "NELBO (continuous eq. 11, or discrete eq. 10 with mdlm.discrete_steps) + prior KL"
    likelihood_source = "MDLM Table 1, BD3-LM Table 3: MDLM below SEDD"
    samplers = ("ancestral", "first_hitting", "remdm", "confidence")

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        return 2.0

    def __init__(self, cfg, **kw) -> None:
        super().__init__(cfg, **kw)
        self.window = (cfg.clip_min, cfg.clip_max)

    # ---- time and corruption -------------------------------------------------------------

    def time_groups(self, length: int) -> int:
        """Training times per sequence: one here, one per block for BD3-LM."""
        return 1

    def training_times(self, batch: int, length: int, *, generator=None, device=None) -> torch.Tensor:
        """(B,) float64 times, one per sequence ((B, K) with K time groups), stratified over all of
        them, inside the current window."""
        K = self.time_groups(length)
        lo, hi = self.window
        if (lo, hi) == (0.0, 1.0):
            t = self.sample_t(batch * K, generator=generator, device=device)
        else:
            u = stratified_uniform(batch * K, antithetic=self.cfg.antithetic, generator=generator, device=device)
            lo = max(lo, self.cfg.sampling_eps)
            t = lo + (hi - lo) * u
        return t.view(batch, K) if K > 1 else t

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """(n,) float64 times: continuous in [sampling_eps, 1], or the grid i/T when discrete."""
        T = self.cfg.discrete_steps
        if T:
            u = stratified_uniform(n, antithetic=self.cfg.antithetic, generator=generator, device=device)
            return (torch.floor(u * T) + 1) / T
        return super().sample_t(n, generator=generator, device=device)

    def snap_t(self, t: torch.Tensor) -> torch.Tensor:
        """An injected t (B,) as float64; in discrete mode rounded up to the grid i/T, i in 1..T."""
        t = t.to(torch.float64)
        T = self.cfg.discrete_steps
        if T:
            return torch.ceil(t * T - 1e-6).clamp(1, T) / T
        return t

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """z_t ~ q(z_t | x) (B, L): each token masked independently with probability 1 - alpha_t;
        t (B, 1) or (B, L)."""
        p = self.schedule.mask_prob(t.to(torch.float64))  # (B, 1) or (B, L)
        u = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=x0.device)
        return torch.where(u < p, torch.full_like(x0, self.mask_id), x0)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """float64 weight, t's shape, of a masked token's -log x_theta: w(t) (eq. 11) or T(alpha_s -
        alpha_t)/(1 - alpha_t) with s = t - 1/T (eq. 10, times T for the uniform draw of i)."""
        T = self.cfg.discrete_steps
        if not T:
            return self.schedule.weight(t)
        s = (t - 1.0 / T).clamp_min(0.0)
        m_t, m_s = self.schedule.mask_prob(t), self.schedule.mask_prob(s)  # alpha_s - alpha_t = m_t - m_s
        return T * (m_t - m_s) / m_t

    # ---- the one network call ------------------------------------------------------------

    def log_x_theta(self, model, zt: torch.Tensor, t: torch.Tensor, *, x0: torch.Tensor | None = None,
                    cache=None, at: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log x_theta(z_t, t) (B, L, V) under SUBS; t (B, 1) or (B, L). The noise level reaches the
        backbone only when time-conditioned (else sigma = 0, so the output does not depend on t).
        x0 is not used by MDLM (BD3-LM passes its clean prefix); cache is the backbone's KV cache;
        at (B, L) bool, marking MASK positions only, asks for those alone, returned as (N, V) in
        row-major order (the loss and the samplers read only masked positions, and the backbone
        then skips the others in its last block; `fill_unmasked` completes them to (B, L, V))."""
        sigma = self.schedule.total_noise(t).float() if self.time_conditioned else None
        logits = model(zt, sigma=sigma, mask="bidirectional", cache=cache, logits_at=at)
        return subs_at(logits, zt, at, self.mask_id, dtype=dtype)

    def token_loss(self, model, x0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, *,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, L): weight(t) * -log x_theta(z_t)[x0] at masked positions, exactly 0 elsewhere (where
        SUBS carries the token over, so only masked positions are scored)."""
        masked = zt == self.mask_id
        logp = self.log_x_theta(model, zt, t, x0=x0, at=masked, dtype=dtype)  # (N, V)
        nll = -logp.gather(-1, x0[masked][:, None]).squeeze(-1)  # (N,)
        weight = self.loss_weight(t.to(torch.float64)).expand(zt.shape)[masked].to(nll.dtype)
        return torch.zeros(zt.shape, dtype=nll.dtype, device=zt.device).masked_scatter(masked, weight * nll)

    def fill_unmasked(self, rows: torch.Tensor, z: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """(B, L, V) log x_theta from log_x_theta's rows (N, V) at the MASK positions `at`: the
        carry-over one-hot everywhere else, as the full pass gives it."""
        out = carried_over(z, rows.shape[-1], rows.dtype)
        out[at] = rows
        return out

    def sampled_nll(self, model, x0, t, generator=None, *, dtype=torch.float64, given=None) -> torch.Tensor:
        """(B, L) token_loss at z_t ~ q(z_t | x0), one t per sequence; `given` positions stay
        unmasked, so SUBS carries them over and they add exactly 0."""
        return self.token_loss(model, x0, keep_given(x0, self.corrupt(x0, t, generator), given), t, dtype=dtype)

    def prior_nll(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) alpha_1 log(V - 1): KL(q(z_1 | x) || (1 - alpha_1) MASK + alpha_1 Uniform)."""
        one = torch.ones((), dtype=torch.float64, device=x0.device)
        kl = self.schedule.alpha(one) * math.log(self.vocab_size - 1 - len(self.never_emitted))
        return kl.expand(x0.shape)

    # ---- the clipped-window search (BD3-LM §4) ---------------------------------------------

    @property
    def adapt_every(self) -> int:
        return self.cfg.search_every

    @property
    def adapt_batches(self) -> int:
        return self.cfg.search_batches

    def window_candidates(self) -> list[tuple[float, float]]:
        return window_grid()

    def window_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, L) training loss integrand at the training times t (B,) or (B, K)."""
        return self.sampled_nll(model, x0, time_per_position(t, x0.shape[1]), generator, dtype=torch.float32)

    @torch.no_grad()
    def adapt(self, model, batches: list[torch.Tensor], generator=None) -> dict:
        """Choose the training window with the lowest variance of the loss per time group (per
        sequence; per block for BD3-LM), BD3-LM §4.

        Every batch is scored `search_draws` times at times stratified over the full window, one
        per time group. A time uniform on the full window and conditioned to fall in a candidate
        window is uniform on that window, so a candidate's variance is the variance of the group
        losses whose time fell inside it: every candidate is judged on the same draws, and the
        search costs `search_draws` passes per batch for all 63 candidates (`window_variance`;
        BD3-LM's mask mode reweights the draws there). A candidate without
        times (the full-mask window of L' = 1) is scored on its own; one that no two draws fell in
        is left out. The window with the smallest variance becomes `self.window`. Returns what to
        log."""
        training_window = self.window
        self.window = (0.0, 1.0)
        draws = [self.group_losses(model, x0, generator) for x0 in batches for _ in range(self.cfg.search_draws)]
        pooled = [torch.cat(column) for column in zip(*draws)]  # times, losses (and what a subclass adds)
        variances = {}
        for window in self.window_candidates():
            if window[0] >= FULL_MASK:
                self.window = window
                loss = torch.cat([self.group_losses(model, x0, generator)[1] for x0 in batches])
                variance = float(loss.var()) if len(loss) > 1 else None
            else:
                variance = self.window_variance(window, *pooled)
            if variance is not None:
                variances[f"{window[0]:.2f}-{window[1]:.2f}"] = variance
        self.window = training_window
        if variances:
            best = min(variances, key=variances.get)
            self.window = tuple(float(v) for v in best.split("-"))
        return {self.window_key: list(self.window), f"{self.window_key}_variance": variances}

    def window_variance(self, window: tuple[float, float], times: torch.Tensor,
                        losses: torch.Tensor) -> float | None:
        """A candidate window's loss variance from the pooled draws: those whose time fell inside
        it (None when fewer than two did)."""
        loss = losses[(times >= window[0]) & (times <= window[1])]
        return float(loss.var()) if len(loss) > 1 else None

    def group_losses(self, model, x0: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*K,) times and (B*K,) float64 losses of the K time groups of each sequence under the
        current window: the mean over a group's positions of the weighted token loss."""
        B, L = x0.shape
        K = self.time_groups(L)
        t = self.training_times(B, L, generator=generator, device=x0.device)
        nll = self.window_nll(model, x0, t, generator)
        return t.reshape(-1), nll.view(B, K, -1).mean(-1).reshape(-1).double()

    @property
    def window_key(self) -> str:
        return f"{self.name}_window"

    def state_dict(self) -> dict:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        if "window" in state:
            self.window = tuple(float(v) for v in state["window"])

    def describe_adapted(self, records: list[dict]) -> dict[str, str]:
        windows = [r[self.window_key] for r in records if self.window_key in r]
        if not windows:
            return {}
        return {self.window_key: f"t ~ U[{windows[-1][0]}, {windows[-1][1]}] (chosen by the search)"}

    def sampler(self, cfg):
        """The sampler a SampleConfig names: ancestral (default) | first_hitting | remdm (ReMDM
        remasking) | confidence (threshold-parallel decoding); docs/samplers.md."""
        from ddlm.sampling.ancestral import AncestralSampler, FirstHittingSampler
        from ddlm.sampling.confidence import ConfidenceSampler
        from ddlm.sampling.remask import RemaskingSampler

        common = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stride=cfg.stride)
        name = self.sampler_name(cfg)
        if name == "first_hitting":
            return FirstHittingSampler(self, **common)
        if name == "confidence":
            return ConfidenceSampler(self, threshold=cfg.threshold, steps=cfg.steps, t_min=cfg.t_min, **common)
        if name == "remdm":
            return RemaskingSampler(self, remask=cfg.remask, eta=cfg.eta, t_on=cfg.t_on, t_off=cfg.t_off,
                                    alpha_on=cfg.alpha_on, steps=cfg.steps, use_cache=cfg.cache,
                                    t_min=cfg.t_min, noise_removal=cfg.noise_removal, **common)
        return AncestralSampler(self, steps=cfg.steps, use_cache=cfg.cache, t_min=cfg.t_min,
                                noise_removal=cfg.noise_removal, **common)
