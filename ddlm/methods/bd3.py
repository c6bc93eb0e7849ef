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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, register
from ddlm.methods.mdlm import FULL_MASK, MDLM, MDLMConfig, subs_at, window_grid
from ddlm.nn.attention import block_diffusion_block_mask, block_diffusion_groups, flex_available


@dataclass
class BD3Config(MDLMConfig):
    """Options of BD3-LM (`--bd3.<field>=value`); MDLM's options apply per block (the clipped
    window among them: bd3.clip_min, clip_max, search_every, search_batches)."""

    block_size: int = 4
    """Tokens per block L' (it must divide data.seq_len); 1 is AR, seq_len is MDLM."""
    attention: str = "dense"
    """Training pass: dense (SDPA with a boolean 2L x 2L mask) | flex (FlexAttention's sparse
    block mask, compiled; needs a torch that has it)."""

    def validate(self) -> None:
        self.check_all("bd3", [
            (self.discrete_steps >= 0, f"bd3.discrete_steps={self.discrete_steps} must be >= 0"),
            (self.block_size >= 1, f"bd3.block_size={self.block_size} must be >= 1"),
            *self.window_checks("bd3"),
            (self.attention in ("dense", "flex"), f"bd3.attention={self.attention!r} must be dense or flex"),
            (self.attention != "flex" or flex_available(),
             "bd3.attention=flex needs a torch with FlexAttention; use dense"),
        ])


@register
class BD3(MDLM):
    name = "bd3"
    config_class = BD3Config
    bound_name = "block NELBO (MDLM eq. 11 per block given the clean prefix) + prior KL"

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
        given) the full-mask loss."""
        if t is not None or not self.full_mask:
            return super().loss(model, x0, t=t, loss_mask=loss_mask, generator=generator)
        nll = self.full_mask_nll(model, x0)
        weights = torch.ones_like(nll) if loss_mask is None else loss_mask.to(nll.dtype)
        nll = nll * weights
        return LossOutput(loss=nll.sum() / weights.sum().clamp_min(1), token_nll=nll, weights=weights)

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
        return window_grid(self.block_size)

    def window_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        if self.full_mask:
            return self.full_mask_nll(model, x0)
        return super().window_nll(model, x0, t, generator)

    # ---- sampling --------------------------------------------------------------------------

    def sampler(self, cfg):
        """Block by block; inside a block MDLM's ancestral (cfg.steps per block) or first-hitting."""
        from ddlm.sampling.block import BlockSampler

        return BlockSampler(self, super().sampler(cfg), use_kv_cache=cfg.cache, stride=cfg.stride,
                            stop_eos=cfg.stop_eos, stop_entropy=cfg.stop_entropy,
                            entropy_window=cfg.entropy_window)
