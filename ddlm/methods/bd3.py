"""BD3-LM: block discrete denoising diffusion (Arriola et al., ICLR 2025).

The sequence is cut into K = L / L' blocks of L' tokens. Blocks are autoregressive, and each block
is a masked diffusion (MDLM) given the clean blocks before it (paper eq. 3-5):

    log p(x) = sum_b log p(x^b | x^{<b})
             >= -sum_b E_{t_b ~ U[0,1]} E_{z ~ q} [ w(t_b) sum_{l in b: z_l = m} -log x_theta(z^b, x^{<b})_l[x_l] ]

with MDLM's SUBS parameterisation and weight w(t) = -alpha'_t / (1 - alpha_t), one time t_b per block
(low-discrepancy over batch x blocks), and MDLM's prior term per token. L' = 1 is an AR model (at
t = 1 every block is a single MASK and the bound is the AR NLL); L' = L is MDLM.

Vectorised training (paper §3.2): one pass over x_t (+) x_0, 2L tokens, both halves at positions
0..L-1, under `block_diffusion_mask` (ddlm/nn/attention.py): a noisy block sees itself and the clean
blocks before it, a clean block sees the clean blocks up to itself. Only the x_t half is scored. The
x_0 half's keys and values are exactly what the sampler caches for each finished block.

Clipped schedules (paper §4): training times are drawn per block from a window t ~ U[beta, omega]
(mask rate (1 - eps) t under the log-linear schedule), the weight unchanged; with `search_every`,
the trainer calls `adapt` on held-out batches and the window whose per-block loss has the lowest
variance is kept (`state_dict`, saved in the checkpoint). The window (1, 1) (every token of a block
masked, weight 1) is the AR loss; it is a candidate for L' = 1. Evaluation ignores the window:
`nll_bound` always draws t ~ U[sampling_eps, 1], the same protocol as MDLM. The window and its
search are MDLM's (ddlm/methods/mdlm.py, where the sequence is one block), applied per block here.

What the window clips (`bd3.clip_mode`). The paper (§4) clips the mask *rate*: t_b ~ U[beta, omega]
and each token of block b masked independently with probability 1 - alpha_{t_b}, so a block of
L' = 4 tokens still ends up with 0 or 4 masked tokens now and then. The public code
(kuleshov-group/bd3lms, `training.resample=True` in its training scripts) also redraws a block's
mask until its realised masked fraction k / L' lies in [beta, omega] (its `_resample_q_xt`). The
default here is `time`, what the paper writes (and what the window meant before this option
existed); `mask` is the public code's objective, for parity with its published runs. For large
blocks the two nearly agree (k / L' concentrates at the rate); for L' = 4 and U[.45, .95] only
k = 2 or 3 is allowed in `mask`, while `time` also trains on k = 0, 1 and 4.

`mask` draws the public code's law exactly and in bounded time, without its unbounded loop: a
redraw until the count lands in the allowed set A = {k : beta <= k / L' <= omega} is a draw from
q(z | x, t) conditioned on A. Here the block's first draw is kept when its count is in A, and
otherwise replaced by one draw from the conditional law itself: a count from the binomial
Binom(L', 1 - alpha_t) restricted to A (inverse CDF over the L' + 1 counts), and that many
positions uniformly at random. Keeping an in-window first draw and replacing the others gives
P(A) q_A + (1 - P(A)) q_A = q_A, the conditioned law, in one vectorised step. Windows with no
count k >= 1 in A (a 4-token block and [0.3, 0.45]; most grid windows of L' = 1) are refused, and
left out of the search. The weight stays eq. 11's w(t) of the block's sampled t in both modes
(what the resampled law makes of the objective: `clipped_nll`). The public code's other rule,
weight 1 for any window starting above 0.5, is not reproduced (in the search grid only the
full-mask window starts there, and its weight is 1 here too). The window search scores each
candidate under the mode's law (`adapt`; under `mask` its pooled draws are reweighted, see
`window_variance`). Evaluation (`nll_bound`) is the full-window NELBO in either mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, register
from ddlm.methods.mdlm import FULL_MASK, MDLM, MDLMConfig, subs_at, window_grid
from ddlm.methods.noise import time_per_position
from ddlm.nn.attention import block_diffusion_block_mask, block_diffusion_groups, flex_available

CLIP_MODES = ("time", "mask")


def allowed_counts(block_size: int, window: tuple[float, float]) -> torch.Tensor:
    """(L' + 1,) bool: the masked counts k = 0..L' of a block whose fraction k / L' lies in the
    window [lo, hi] (the window's own ends, not raised to sampling_eps: lo = 0 allows k = 0)."""
    frac = torch.arange(block_size + 1, dtype=torch.float64) / block_size
    return (frac >= window[0] - 1e-9) & (frac <= window[1] + 1e-9)


def binomial_log_pmf(n: int, p: torch.Tensor) -> torch.Tensor:
    """(..., n + 1) float64 log Binom(k; n, p) for k = 0..n and rates p (...); xlogy makes the
    ends exact at p = 0 and p = 1."""
    p = p.to(torch.float64)[..., None]
    k = torch.arange(n + 1, dtype=torch.float64, device=p.device)
    log_choose = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return log_choose + torch.xlogy(k, p) + torch.xlogy(n - k, 1 - p)


def weighted_variance(x: torch.Tensor, w: torch.Tensor) -> float:
    """The variance of x under importance weights w (reliability weights: for equal weights it is
    the sample variance, n - 1 in the denominator)."""
    w = w / w.sum()
    mean = (w * x).sum()
    return float((w * (x - mean) ** 2).sum() / (1 - (w ** 2).sum()))


@dataclass
class BD3Config(MDLMConfig):
    """Options of BD3-LM (`--bd3.<field>=value`); MDLM's options apply per block (the clipped
    window among them: bd3.clip_min, clip_max, search_every, search_batches)."""

    block_size: int = 4
    """Tokens per block L' (it must divide data.seq_len); 1 is AR, seq_len is MDLM."""
    attention: str = "dense"
    """Training pass: dense (SDPA with a boolean 2L x 2L mask) | flex (FlexAttention's sparse
    block mask, compiled; needs a torch that has it)."""
    clip_mode: str = "time"
    """What the training window [clip_min, clip_max] clips: time (the paper, §4: each block's t in
    the window, its tokens masked independently) | mask (the public code's resampling: also each
    block's masked fraction k/L' in the window, the mask drawn from q conditioned on that; weight
    w(t) unchanged). Evaluation always uses the full window."""

    def validate(self) -> None:
        self.check_all("bd3", [
            (self.discrete_steps >= 0, f"bd3.discrete_steps={self.discrete_steps} must be >= 0"),
            (self.block_size >= 1, f"bd3.block_size={self.block_size} must be >= 1"),
            *self.window_checks("bd3"),
            (self.clip_mode in CLIP_MODES, f"bd3.clip_mode={self.clip_mode!r} must be time or mask"),
            (self.clip_mode != "mask" or self.block_size < 1
             or allowed_counts(self.block_size, (self.clip_min, self.clip_max))[1:].any(),
             f"bd3.clip_mode=mask: no masked fraction k/{self.block_size} with k >= 1 lies in "
             f"[{self.clip_min}, {self.clip_max}]; widen the window or use bd3.clip_mode=time"),
            (self.attention in ("dense", "flex"), f"bd3.attention={self.attention!r} must be dense or flex"),
            (self.attention != "flex" or flex_available(),
             "bd3.attention=flex needs a torch with FlexAttention; use dense"),
        ])


@register
class BD3(MDLM):
    name = "bd3"
    config_class = BD3Config
    bound_name = "block NELBO (MDLM eq. 11 per block given the clean prefix) + prior KL"
    likelihood_source = "BD3-LM Table 3: the bound grows with L' and stays below MDLM's (L' = L)"

    @classmethod
    def variant(cls, options: dict) -> str:
        return f"bd3-{options.get('block_size', BD3Config.block_size)}"

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        """Between AR (0) and MDLM (2), growing with L'; L' = 1 is AR's loss (rank 1)."""
        return 2.0 - 1.0 / math.log2(2 * options.get("block_size", BD3Config.block_size))

    def __init__(self, cfg, **kw) -> None:
        super().__init__(cfg, **kw)
        if self.context and self.context % cfg.block_size:
            raise ConfigError(f"bd3.block_size={cfg.block_size} does not divide data.seq_len={self.context}")

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def blocks(self, length: int) -> int:
        if length % self.block_size:
            raise ConfigError(f"sequence length {length} is not a multiple of bd3.block_size={self.block_size}")
        return length // self.block_size

    # ---- time and corruption: one t per block ---------------------------------------------

    def time_groups(self, length: int) -> int:
        return self.blocks(length)

    def training_times(self, batch: int, length: int, *, generator=None, device=None) -> torch.Tensor:
        """(B, K) float64 times, stratified over the B*K blocks, inside the current window (the
        full-mask window (1, 1) has no times: `loss` then uses `full_mask_nll`; these are the full
        window's)."""
        if self.full_mask:
            K = self.blocks(length)
            return self.sample_t(batch * K, generator=generator, device=device).view(batch, K)
        return super().training_times(batch, length, generator=generator, device=device).view(batch, -1)

    def eval_times(self, batch: int, length: int, n_samples: int, *, generator=None,
                   device=None) -> torch.Tensor:
        """(n, B, K): the full window, stratified jointly over samples x batch x blocks."""
        K = self.blocks(length)
        return self.sample_t(n_samples * batch * K, generator=generator, device=device).view(n_samples, batch, K)

    @property
    def full_mask(self) -> bool:
        """Whether training uses the full-mask window (1, 1): every token masked, weight 1."""
        return self.window[0] >= FULL_MASK

    def full_mask_nll(self, model, x0: torch.Tensor, *, dtype=torch.float32) -> torch.Tensor:
        """(B, L) -log x_theta(x_l | all of block b(l) masked, clean prefix): the full-mask window's
        loss; for L' = 1 it is the AR NLL -log p_theta(x_l | x_<l)."""
        zt = torch.full_like(x0, self.mask_id)
        t = torch.ones(x0.shape[0], 1, dtype=torch.float64, device=x0.device)
        logp = self.log_x_theta(model, zt, t, x0=x0, dtype=dtype)
        return -logp.gather(-1, x0[..., None]).squeeze(-1)

    def loss(self, model, x0, *, t=None, loss_mask=None, generator=None) -> LossOutput:
        """MDLM's loss with one time per block from the window; in the full-mask window (and no t
        given) the full-mask loss; under bd3.clip_mode=mask (and no t given) with each block's
        mask conditioned on the window (`window_corrupt`). An injected t is scored as given."""
        if t is None and self.full_mask:
            nll = self.full_mask_nll(model, x0)
        elif t is None and self.clips_masks:
            nll = self.clipped_nll(model, x0, self.training_times(*x0.shape, generator=generator,
                                                                   device=x0.device), generator)[0]
        else:
            return super().loss(model, x0, t=t, loss_mask=loss_mask, generator=generator)
        weights = torch.ones_like(nll) if loss_mask is None else loss_mask.to(nll.dtype)
        nll = nll * weights
        return LossOutput(loss=nll.sum() / weights.sum().clamp_min(1), token_nll=nll, weights=weights)

    # ---- the mask mode: each block's masked fraction inside the window ----------------------

    @property
    def clips_masks(self) -> bool:
        """Whether training conditions each block's mask on the window (bd3.clip_mode=mask and a
        window that rules out some count; the full window rules out none)."""
        return self.cfg.clip_mode == "mask" and not self.allowed().all()

    def allowed(self, window: tuple[float, float] | None = None) -> torch.Tensor:
        """(L' + 1,) bool: the masked counts the window (default: the training window) allows."""
        return allowed_counts(self.block_size, window or self.window)

    def window_corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """z_t (B, L) for training: q(z_t | x) per token, then, under bd3.clip_mode=mask, every block
        whose masked count k is outside A = allowed() replaced by a draw from q conditioned on A.
        t (B, 1) or (B, L), one value per block.

        Given t, the count of a block is Binom(L', 1 - alpha_t) and, given the count, the masked
        positions are a uniform subset; conditioning on A restricts the count's law to A and
        leaves the positions uniform. One draw for every block (count by inverse CDF, positions by
        the ranks of uniform noise), used only where the first draw fell outside A: the result is
        distributed as q conditioned on A (module docstring), what the public code's redraw loop
        reaches, in one vectorised pass."""
        zt = self.corrupt(x0, t, generator)
        allowed = self.allowed().to(x0.device)
        if self.cfg.clip_mode != "mask" or allowed.all():
            return zt
        B, L = x0.shape
        n, K = self.block_size, self.blocks(L)
        rate = self.schedule.mask_prob(t.to(torch.float64)).expand(B, L)[:, ::n]  # (B, K)
        first = (zt == self.mask_id).view(B, K, n)
        outside = ~allowed[first.sum(-1)]  # (B, K)
        law = binomial_log_pmf(n, rate).masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, K, n + 1)
        u = torch.rand((B, K, 1), dtype=torch.float64, generator=generator, device=x0.device)
        count = (law.cumsum(-1) <= u).sum(-1).clamp_max(int(allowed.nonzero().max()))  # (B, K) in A
        noise = torch.rand((B, K, n), dtype=torch.float64, generator=generator, device=x0.device)
        fresh = noise.argsort(-1).argsort(-1) < count[..., None]  # (B, K, n): `count` uniform positions
        masked = torch.where(outside[..., None], fresh, first).view(B, L)
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    def clipped_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) training loss integrand at block times t (B, K) and the z_t it scored.

        The weight is eq. 11's w(t) of the block's own t, as in the public code. Under the mask
        mode z_t ~ q_A(z | x, t) = q(z | x, t) 1_A(z) / P_t(A), so the expected loss of a block is
            E_{t ~ U[beta, omega]} [ w(t) E_q[ 1_A(z) sum_{l in b: z_l = m} -log x_theta(z)_l[x_l] ] / P_t(A) ]
        (eq. 11's integrand restricted to masks in the window and renormalised per t by P_t(A)):
        a training objective, not a bound, as the time window already is. Weighting by w(t) P_t(A)
        instead would give the time window's objective with out-of-window masks dropped; the
        public code does not, and nor does this."""
        tp = time_per_position(t, x0.shape[1])
        zt = self.window_corrupt(x0, tp, generator)
        return self.token_loss(model, x0, zt, tp, dtype=torch.float32), zt

    # ---- the one network call --------------------------------------------------------------

    def log_x_theta(self, model, zt, t, *, x0=None, cache=None, at=None, dtype=torch.float32):
        """log x_theta (B, L, V) under SUBS, or (N, V) at the positions `at` (B, L) marks.

        With x0 (training, evaluation): one pass over z_t (+) x_0 under the block-diffusion mask,
        the noise level (when time-conditioned) on the z_t half and 0 on the x_0 half. Without x0
        (sampling): z_t is the current block; the clean prefix comes from the KV cache (or the
        sampler's prefix-recomputing model), as for MDLM."""
        if x0 is None:
            return super().log_x_theta(model, zt, t, cache=cache, at=at, dtype=dtype)
        B, L = zt.shape
        self.blocks(L)
        sigma = None
        if self.time_conditioned:
            noisy = self.schedule.total_noise(t.to(torch.float64)).float().expand(B, L)
            sigma = torch.cat([noisy, torch.zeros_like(noisy)], dim=1)  # (B, 2L)
        positions = torch.arange(L, device=zt.device).repeat(2)
        mask = self.training_mask(L, zt.device)
        logits = model(torch.cat([zt, x0], dim=1), sigma=sigma, mask=mask, positions=positions,
                       logits_for=L, logits_at=at)  # (B, L, V): the z_t half, or its rows at `at`
        return subs_at(logits, zt, at, self.mask_id, dtype=dtype)

    def training_mask(self, length: int, device: torch.device):
        """The (2L, 2L) mask of the vectorised pass: dense boolean (as query groups that skip the
        clean-to-noisy quarter), or FlexAttention's BlockMask."""
        if self.cfg.attention == "dense":
            return block_diffusion_groups(length, self.block_size, str(device))
        if device.type == "cpu" and torch.is_grad_enabled():
            raise ConfigError("bd3.attention=flex cannot train on CPU (FlexAttention has no CPU "
                              "backward pass); use bd3.attention=dense")
        return block_diffusion_block_mask(length, self.block_size, str(device))

    # ---- the clipped-window search: MDLM's, per block, with the full-mask window for L' = 1 ----

    def window_candidates(self) -> list[tuple[float, float]]:
        """The grid; under the mask mode only windows that allow a count k >= 1."""
        grid = window_grid(self.block_size)
        if self.cfg.clip_mode != "mask":
            return grid
        return [w for w in grid if self.allowed(w)[1:].any()]

    def window_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        if self.full_mask:
            return self.full_mask_nll(model, x0)
        if self.clips_masks:
            return self.clipped_nll(model, x0, t, generator)[0]
        return super().window_nll(model, x0, t, generator)

    def group_losses(self, model, x0: torch.Tensor, generator=None) -> tuple[torch.Tensor, ...]:
        """MDLM's (times, losses) per block; under the mask mode also each block's masked count,
        which `window_variance` needs."""
        if self.cfg.clip_mode != "mask" or self.full_mask:
            return super().group_losses(model, x0, generator)
        B, L = x0.shape
        t = self.training_times(B, L, generator=generator, device=x0.device)  # (B, K)
        nll, zt = self.clipped_nll(model, x0, t, generator)
        loss = nll.view(B, t.shape[1], -1).mean(-1).reshape(-1).double()
        counts = (zt == self.mask_id).view(B, t.shape[1], -1).sum(-1).reshape(-1)
        return t.reshape(-1), loss, counts

    def window_variance(self, window, times, losses, counts=None) -> float | None:
        """A candidate's loss variance from the search's pooled draws (t stratified over the full
        window, z ~ q(z | x, t)). Under the mask mode the candidate's law is t ~ U[window],
        z ~ q_A: the draws with t in the window and a count in A have density proportional to
        P_t(A) q_A, so they are kept with importance weights 1 / P_t(A)."""
        if counts is None:
            return super().window_variance(window, times, losses)
        allowed = self.allowed(window).to(counts.device)
        inside = (times >= window[0]) & (times <= window[1]) & allowed[counts]
        if inside.sum() < 2:
            return None
        log_pmf = binomial_log_pmf(self.block_size, self.schedule.mask_prob(times[inside]))
        p_allowed = log_pmf[:, allowed].logsumexp(-1).exp()  # P_t(A) of each kept draw
        return weighted_variance(losses[inside], 1 / p_allowed)

    # ---- sampling --------------------------------------------------------------------------

    def sampler(self, cfg):
        """Block by block; inside a block MDLM's ancestral (cfg.steps per block), first-hitting, remdm or
        confidence (MDLM.samplers)."""
        from ddlm.sampling.block import BlockSampler

        return BlockSampler(self, super().sampler(cfg), use_kv_cache=cfg.cache, stride=cfg.stride,
                            stop_eos=cfg.stop_eos, stop_entropy=cfg.stop_entropy,
                            entropy_window=cfg.entropy_window)
