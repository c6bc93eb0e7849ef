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
`nll_bound` always draws t ~ U[sampling_eps, 1], the same protocol as MDLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, register
from ddlm.methods.mdlm import MDLM, MDLMConfig, subs_log_probs
from ddlm.methods.noise import stratified_uniform, time_per_position
from ddlm.nn.attention import block_diffusion_block_mask, block_diffusion_groups, flex_available

FULL_MASK = 1.0  # the window (1, 1): every token of a block masked, weight 1 (the AR loss when L' = 1)


@dataclass
class BD3Config(MDLMConfig):
    """Options of BD3-LM (`--bd3.<field>=value`); MDLM's options apply per block."""

    block_size: int = 4
    """Tokens per block L' (it must divide data.seq_len); 1 is AR, seq_len is MDLM."""
    clip_min: float = 0.0
    """Training times per block t ~ U[max(clip_min, sampling_eps), clip_max]; 1 = every token masked."""
    clip_max: float = 1.0
    """Upper end of the training-time window."""
    search_every: int = 0
    """Every N training steps, choose the window with the lowest loss variance (0: keep it fixed)."""
    search_batches: int = 4
    """Held-out batches the window search evaluates each window on."""
    attention: str = "dense"
    """Training pass: dense (SDPA with a boolean 2L x 2L mask) | flex (FlexAttention's sparse
    block mask, compiled; needs a torch that has it)."""

    def validate(self) -> None:
        self.check_all("bd3", [
            (self.discrete_steps >= 0, f"bd3.discrete_steps={self.discrete_steps} must be >= 0"),
            (self.block_size >= 1, f"bd3.block_size={self.block_size} must be >= 1"),
            (0.0 <= self.clip_min <= self.clip_max <= 1.0,
             f"bd3.clip_min={self.clip_min}, clip_max={self.clip_max} need 0 <= min <= max <= 1"),
            (self.search_every >= 0, f"bd3.search_every={self.search_every} must be >= 0"),
            (self.search_batches >= 1, f"bd3.search_batches={self.search_batches} must be >= 1"),
            (self.discrete_steps == 0 or ((self.clip_min, self.clip_max) == (0.0, 1.0) and not self.search_every),
             "bd3.discrete_steps works only with the full window (bd3.clip_min=0, clip_max=1, no search)"),
            (self.attention in ("dense", "flex"), f"bd3.attention={self.attention!r} must be dense or flex"),
            (self.attention != "flex" or flex_available(),
             "bd3.attention=flex needs a torch with FlexAttention; use dense"),
        ])


def window_grid(block_size: int) -> list[tuple[float, float]]:
    """Candidate windows of the search (paper §4): widths 0.5..0.9 in steps of 0.05, starts 0..1-w
    in steps of 0.05; for L' = 1 also the full-mask window (1, 1)."""
    out = []
    for w in range(50, 95, 5):
        out += [(s / 100, (s + w) / 100) for s in range(0, 100 - w + 1, 5)]
    return out + ([(FULL_MASK, FULL_MASK)] if block_size == 1 else [])


@register
class BD3(MDLM):
    name = "bd3"
    config_class = BD3Config
    bound_name = "block NELBO (MDLM eq. 11 per block given the clean prefix) + prior KL"

    def __init__(self, cfg, **kw) -> None:
        super().__init__(cfg, **kw)
        if self.context and self.context % cfg.block_size:
            raise ConfigError(f"bd3.block_size={cfg.block_size} does not divide data.seq_len={self.context}")
        self.window = (cfg.clip_min, cfg.clip_max)

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def blocks(self, length: int) -> int:
        if length % self.block_size:
            raise ConfigError(f"sequence length {length} is not a multiple of bd3.block_size={self.block_size}")
        return length // self.block_size

    # ---- time and corruption: one t per block ---------------------------------------------

    def training_times(self, batch: int, length: int, *, generator=None, device=None) -> torch.Tensor:
        """(B, K) float64 times, stratified over the B*K blocks, inside the current window (the
        full-mask window (1, 1) has no times: `loss` then uses `full_mask_nll`; these are the full
        window's)."""
        K = self.blocks(length)
        lo, hi = self.window
        if (lo, hi) == (0.0, 1.0) or self.full_mask:
            return self.sample_t(batch * K, generator=generator, device=device).view(batch, K)
        u = stratified_uniform(batch * K, antithetic=self.cfg.antithetic, generator=generator, device=device)
        lo = max(lo, self.cfg.sampling_eps)
        return (lo + (hi - lo) * u).view(batch, K)

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
        given) the full-mask loss."""
        if t is not None or not self.full_mask:
            return super().loss(model, x0, t=t, loss_mask=loss_mask, generator=generator)
        nll = self.full_mask_nll(model, x0)
        weights = torch.ones_like(nll) if loss_mask is None else loss_mask.to(nll.dtype)
        nll = nll * weights
        return LossOutput(loss=nll.sum() / weights.sum().clamp_min(1), token_nll=nll, weights=weights)

    # ---- the one network call --------------------------------------------------------------

    def log_x_theta(self, model, zt, t, *, x0=None, cache=None, dtype=torch.float32):
        """log x_theta (B, L, V) under SUBS.

        With x0 (training, evaluation): one pass over z_t (+) x_0 under the block-diffusion mask,
        the noise level (when time-conditioned) on the z_t half and 0 on the x_0 half. Without x0
        (sampling): z_t is the current block; the clean prefix comes from the KV cache (or the
        sampler's prefix-recomputing model), as for MDLM."""
        if x0 is None:
            return super().log_x_theta(model, zt, t, cache=cache, dtype=dtype)
        B, L = zt.shape
        self.blocks(L)
        sigma = None
        if self.time_conditioned:
            noisy = self.schedule.total_noise(t.to(torch.float64)).float().expand(B, L)
            sigma = torch.cat([noisy, torch.zeros_like(noisy)], dim=1)  # (B, 2L)
        positions = torch.arange(L, device=zt.device).repeat(2)
        mask = self.training_mask(L, zt.device)
        logits = model(torch.cat([zt, x0], dim=1), sigma=sigma, mask=mask, positions=positions,
                       logits_for=L)  # (B, L, V): the z_t half
        return subs_log_probs(logits, zt, self.mask_id, dtype=dtype)

    def training_mask(self, length: int, device: torch.device):
        """The (2L, 2L) mask of the vectorised pass: dense boolean (as query groups that skip the
        clean-to-noisy quarter), or FlexAttention's BlockMask."""
        if self.cfg.attention == "dense":
            return block_diffusion_groups(length, self.block_size, str(device))
        if device.type == "cpu" and torch.is_grad_enabled():
            raise ConfigError("bd3.attention=flex cannot train on CPU (FlexAttention has no CPU "
                              "backward pass); use bd3.attention=dense")
        return block_diffusion_block_mask(length, self.block_size, str(device))

    # ---- the clipped-window search ---------------------------------------------------------

    @property
    def adapt_every(self) -> int:
        return self.cfg.search_every

    @property
    def adapt_batches(self) -> int:
        return self.cfg.search_batches

    @torch.no_grad()
    def adapt(self, model, batches: list[torch.Tensor], generator=None) -> dict:
        """Choose the training window with the lowest variance of the per-block loss (paper §4).

        For each window of `window_grid`, every batch is scored at per-block times drawn in that
        window; the variance across the batch's B*K per-block losses is summed over batches. The
        window with the smallest sum becomes `self.window`. Returns what to log."""
        variances = {}
        for lo, hi in window_grid(self.block_size):
            self.window = (lo, hi)
            total = 0.0
            for x0 in batches:
                B, L = x0.shape
                if self.full_mask:
                    nll = self.full_mask_nll(model, x0)
                else:
                    t = time_per_position(self.training_times(B, L, generator=generator, device=x0.device), L)
                    nll = self.sampled_nll(model, x0, t, generator, dtype=torch.float32)  # (B, L)
                total += float(nll.view(B, -1, self.block_size).mean(-1).var())
            variances[f"{lo:.2f}-{hi:.2f}"] = total / len(batches)
        best = min(variances, key=variances.get)
        self.window = tuple(float(v) for v in best.split("-"))
        return {"bd3_window": list(self.window), "bd3_window_variance": variances}

    def state_dict(self) -> dict:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        if "window" in state:
            self.window = tuple(float(v) for v in state["window"])

    def describe_adapted(self, records: list[dict]) -> dict[str, str]:
        windows = [r["bd3_window"] for r in records if "bd3_window" in r]
        return {"bd3_window": f"t ~ U[{windows[-1][0]}, {windows[-1][1]}] (chosen by the search)"} if windows else {}

    # ---- sampling --------------------------------------------------------------------------

    def sampler(self, cfg):
        """Block by block; inside a block MDLM's ancestral (cfg.steps per block) or first-hitting."""
        from ddlm.sampling.block import BlockSampler

        return BlockSampler(self, super().sampler(cfg), use_kv_cache=cfg.cache, stride=cfg.stride,
                            stop_eos=cfg.stop_eos, stop_entropy=cfg.stop_entropy,
                            entropy_window=cfg.entropy_window)
