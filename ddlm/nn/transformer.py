"""The one backbone: a pre-norm transformer with rotary positions that returns logits.

It knows nothing of masking tokens, scores or loss weights; methods parameterise its logits.
Optional noise-level conditioning modulates each block with adaLN (shift, scale, gate), as in
DiT (Peebles & Xie 2023) used by MDLM/SEDD.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddlm.config import ModelConfig
from ddlm.nn.attention import KVCache, MaskSpec, attend


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half form."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (L,) -> cos, sin of shape (L, hd)."""
        if positions.dim() == 1 and self._cached is not None:
            n, cos, sin = self._cached
            if positions.numel() and int(positions.max()) < n and self._is_range(positions):
                start = int(positions[0])
                return cos[start:start + positions.numel()], sin[start:start + positions.numel()]
        angles = positions.float()[..., None] * self.inv_freq  # (L, hd/2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()

    def precompute(self, max_len: int, device=None) -> None:
        cos, sin = self.cos_sin(torch.arange(max_len, device=device))
        self._cached = (max_len, cos, sin)

    @staticmethod
    def _is_range(positions: torch.Tensor) -> bool:
        return positions.numel() == 1 or bool((positions[1:] - positions[:-1] == 1).all())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); cos/sin (L, hd) or (B, 1, L, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the noise level sigma (B,) followed by an MLP -> (B, cond_dim)."""

    def __init__(self, cond_dim: int, n_freq: int = 256) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class Block(nn.Module):
    """Pre-norm attention + MLP, optionally adaLN-modulated by a conditioning vector."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.dropout = layer, cfg.n_heads, cfg.dropout
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=not cfg.time_conditioning)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=not cfg.time_conditioning)
        self.fc = nn.Linear(cfg.dim, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, cfg.dim, bias=False)
        self.modulation = nn.Linear(cfg.cond_dim, 6 * cfg.dim) if cfg.time_conditioning else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: MaskSpec,
                cond: torch.Tensor | None, cache: KVCache | None, cache_write: bool) -> torch.Tensor:
        if self.modulation is not None:
            # (B, 1, D) each: shift/scale/gate of the attention and MLP branches
            s1, c1, g1, s2, c2, g2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
            h = h + g1 * self._attention(self.norm1(h) * (1 + c1) + s1, cos, sin, mask, cache, cache_write)
            return h + g2 * self._mlp(self.norm2(h) * (1 + c2) + s2)
        h = h + self._attention(self.norm1(h), cos, sin, mask, cache, cache_write)
        return h + self._mlp(self.norm2(h))

    def _attention(self, x, cos, sin, mask, cache, cache_write) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        if cache is not None:
            k, v = cache.keys_values(self.layer, k, v, cache_write)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, dropout)  # (B, H, L, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, L, D))
        return F.dropout(y, dropout, self.training) if dropout else y

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc_out(F.gelu(self.fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Transformer(nn.Module):
    """tokens (B, L) -> logits (B, L, V) in float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.max_len <= 0:
            raise ValueError("ModelConfig.vocab_size and max_len must be set before building")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=not cfg.time_conditioning)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.noise_embed = NoiseEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.final_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.dim) if cfg.time_conditioning else None
        self._init_weights()
        self.rotary.precompute(2 * cfg.max_len)

    def _init_weights(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            nn.init.normal_(p, std=std)
            if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            if block.modulation is not None:
                nn.init.zeros_(block.modulation.weight)
        if self.final_modulation is not None:
            nn.init.zeros_(self.final_modulation.weight)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.head_dim,
                       max_len or self.cfg.max_len, dtype=p.dtype, device=p.device)

    def forward(self, tokens: torch.Tensor, *, sigma: torch.Tensor | None = None,
                mask: MaskSpec = "causal", cache: KVCache | None = None, cache_write: bool = True,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L); sigma (B,) noise level when time-conditioned; positions (L,) for RoPE
        (default: continue after the cache). Returns logits (B, L, V) float32."""
        B, L = tokens.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + L, device=tokens.device)
        cos, sin = self.rotary.cos_sin(positions)
        cond = None
        if self.noise_embed is not None:
            if sigma is None:
                sigma = torch.zeros(B, device=tokens.device)
            cond = F.silu(self.noise_embed(sigma.reshape(-1).expand(B) if sigma.numel() == 1 else sigma))
        h = self.embed(tokens)  # (B, L, D)
        for block in self.blocks:
            h = block(h, cos, sin, mask, cond, cache, cache_write)
        h = self.norm(h)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        if cache is not None and cache_write:
            cache.advance(L)
        return self.head(h).float()

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
