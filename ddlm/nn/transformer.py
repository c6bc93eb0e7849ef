"""The one backbone: a pre-norm transformer with rotary positions that returns logits.

It knows nothing of masking tokens, scores or loss weights; methods parameterise its logits.

Two kinds of block (`ModelConfig.block`):
  plain  pre-norm attention + MLP (GPT style, N(0, 0.02) init); with `time_conditioning` its blocks
         are also modulated by the noise level (the layout of ddlm's first diffusion runs).
  gated  adaLN-zero (DiT, Peebles & Xie 2023, as in the MDLM/SEDD backbone): every block's
         attention and MLP branches get a shift, scale and gate computed from a conditioning vector
         c = SiLU(embed(sigma)); the modulation starts at zero, so every block starts as the
         identity; MLP biases, LayerNorm weights. When the method does not feed the noise level,
         sigma = 0 and c is a learned constant: the output then does not depend on t (MDLM's
         no-change cache stays valid).
Positions are rotary by default; `positions=learned` with `bias` and `tie_embeddings` makes the plain
block GPT-2's (learned absolute positions, biases everywhere, the output layer the embedding), so
GPT-2 checkpoints import exactly.
Conditioning may be per sequence, sigma (B,) or (B, 1), or per position: (B, L), or (B, K) with K
dividing L, each of K equal contiguous groups of positions sharing one noise level (one per block).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddlm.nn.config import ModelConfig
from ddlm.nn.attention import KVCache, MaskSpec, attend, first_queries


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half form.

    Its tables are non-persistent buffers: `inv_freq` (hd/2,) and the cos/sin of the first
    `table_len` positions (table_len, hd), so they follow `.to()`, `.to_empty()`, the meta device
    and FSDP, and never enter a state dict. A contiguous range of positions starting at a Python
    int (`span`, what the forward pass asks from the cache length) is a slice of the tables: no
    tensor value is read on the host, nothing breaks a torch.compile graph. Positions past the table
    (a sampler's sliding window) and arbitrary position tensors (BD3-LM's x_t (+) x_0) are computed
    on the fly, with the same arithmetic as the table (on the CPU either way gives the same bits,
    which tests/test_device.py checks)."""

    def __init__(self, head_dim: int, base: float, table_len: int = 0) -> None:
        super().__init__()
        self.head_dim, self.base, self.table_len = head_dim, base, table_len
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("cos_table", torch.empty(table_len, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin_table", torch.empty(table_len, head_dim, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute every table in place on the device it is on (after `.to_empty()`)."""
        with torch.no_grad():
            device = self.inv_freq.device
            hd = self.head_dim
            self.inv_freq.copy_(1.0 / self.base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
            if self.table_len:
                cos, sin = self.cos_sin(torch.arange(self.table_len, device=device))
                self.cos_table.copy_(cos)
                self.sin_table.copy_(sin)

    def precompute(self, max_len: int, device=None) -> None:
        """Tables of the first max_len positions (on `device`; default: where they are)."""
        device = self.inv_freq.device if device is None else torch.device(device)
        self.table_len = max_len
        self.inv_freq = torch.empty_like(self.inv_freq, device=device)
        self.cos_table = torch.empty(max_len, self.head_dim, dtype=torch.float32, device=device)
        self.sin_table = torch.empty(max_len, self.head_dim, dtype=torch.float32, device=device)
        self.reset_buffers()

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions start .. start + length - 1 (Python ints) -> cos, sin (length, hd): views of the
        tables within them, computed past them."""
        if start + length <= self.cos_table.shape[0]:
            return self.cos_table[start:start + length], self.sin_table[start:start + length]
        return self.cos_sin(torch.arange(start, start + length, device=self.inv_freq.device))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (L,), any values -> cos, sin of shape (L, hd), computed (no host read)."""
        angles = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq  # (L, hd/2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                  inverse: bool = False) -> None:
    """out = x rotated by RoPE's angles (the inverse rotation with `inverse`), written in place.
    With halves x = (x1, x2) and c, s the cos and sin of the angles (both halves of `cos`/`sin`
    are equal): y1 = x1 c - x2 s, y2 = x2 c + x1 s; the inverse negates s."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2, y1, y2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    sign = -1.0 if inverse else 1.0
    torch.mul(x1, c, out=y1)
    y1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=y2)
    y2.addcmul_(x1, s, value=sign)


class RotaryQKV(torch.autograd.Function):
    """qkv (B, L, 3, H, hd) -> q, k rotated and v, each (B, H, L, hd) contiguous, in a few fused
    passes; the backward applies the inverse rotation and writes straight into the (B, L, 3, H, hd)
    gradient (autograd of the unfused form spends a tenth of a training step on copies here)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        ctx.save_for_backward(cos, sin)
        x = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
        out = torch.empty(x.shape, dtype=qkv.dtype, device=qkv.device)
        rotate_halves(x[:2], cos, sin, out[:2])
        out[2].copy_(x[2])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        B, H, L, hd = grad_q.shape
        grad = grad_q.new_empty(B, L, 3, H, hd)
        g = grad.permute(2, 0, 3, 1, 4)
        rotate_halves(grad_q, cos, sin, g[0], inverse=True)
        rotate_halves(grad_k, cos, sin, g[1], inverse=True)
        g[2].copy_(grad_v)
        return grad, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """qkv (B, L, 3, H, hd) -> q, k rotated and v, each (B, H, L, hd); cos None: not rotated
    (learned positions). Eager: RotaryQKV's fused passes. Under torch.compile: the same rotation
    written functionally (Dynamo cannot trace the `out=` writes into strided views that make the
    eager form fast; the compiler fuses this one)."""
    if cos is None:
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if not torch.compiler.is_compiling():
        return RotaryQKV.apply(qkv, cos, sin)
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    half = qkv.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    return rotate(q), rotate(k), v


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the noise level sigma (B,) followed by an MLP -> (B, cond_dim). The
    frequencies are a non-persistent buffer (a derived table, as Rotary's)."""

    def __init__(self, cond_dim: int, n_freq: int = 256) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.register_buffer("freqs", torch.empty(n_freq // 2, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the frequencies in place on the device they are on."""
        half = self.n_freq // 2
        with torch.no_grad():
            self.freqs.copy_(torch.exp(-math.log(10000.0) * torch.arange(half, device=self.freqs.device) / half))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma (...) -> (..., cond_dim)."""
        args = sigma.float()[..., None] * self.freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def positions_of(values: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K, ...) per-group values -> (B, 1 or L, ...): K = 1 broadcasts, K | L repeats each of
    the K contiguous groups of L/K positions, K = L is per position."""
    K = values.shape[1]
    if K in (1, length):
        return values
    if length % K:
        raise ValueError(f"{K} groups (noise levels per sequence) do not divide the length {length}")
    return values.repeat_interleave(length // K, dim=1)


def make_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """Gated: LayerNorm with a weight and no bias (DiT); plain: affine, or none when modulated."""
    if cfg.block == "gated":
        return nn.LayerNorm(cfg.dim, bias=False)
    return nn.LayerNorm(cfg.dim, elementwise_affine=not cfg.time_conditioning)


def modulated_norm(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """shift + norm(x) * (1 + scale) for shift, scale (D,), as one LayerNorm."""
    weight = 1 + scale if norm.weight is None else norm.weight * (1 + scale)
    return F.layer_norm(x, norm.normalized_shape, weight.to(x.dtype), shift.to(x.dtype), norm.eps)


def gated_linear(layer: nn.Linear, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """gate * layer(x) for a gate (D_out,): with more tokens than input features (training), one
    linear map with the gate in its weight and bias; with few (a sampler's block), scaling the
    output is cheaper than scaling the weight."""
    if gate is None:
        return layer(x)
    if x.numel() <= x.shape[-1] * layer.in_features:
        return layer(x) * gate
    bias = None if layer.bias is None else layer.bias * gate
    return F.linear(x, layer.weight * gate[:, None], bias)


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x (B, n, D) -> its rows (N, D) of the flattened B * n positions; x itself when rows is None."""
    return x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)


def modulation_rows(mod: torch.Tensor, n: int, rows: torch.Tensor | None) -> torch.Tensor:
    """A per-row modulation (B, 1 or >= n, D) for the first n positions: (B, 1 or n, D), or its
    rows (N, D) of the flattened B * n positions."""
    mod = mod[:, :n]
    return mod if rows is None else take_rows(mod.expand(-1, n, -1), rows)


class Block(nn.Module):
    """Pre-norm attention + MLP, adaLN-modulated by a conditioning vector when it has one."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.dropout = layer, cfg.n_heads, cfg.dropout
        hidden = int(cfg.mlp_ratio * cfg.dim)
        gated = cfg.block == "gated"
        self.norm1 = make_norm(cfg)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.norm2 = make_norm(cfg)
        self.fc = nn.Linear(cfg.dim, hidden, bias=gated or cfg.bias)
        self.fc_out = nn.Linear(hidden, cfg.dim, bias=gated or cfg.bias)
        conditioned = gated or cfg.time_conditioning
        self.modulation = nn.Linear(cfg.cond_dim, 6 * cfg.dim) if conditioned else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: MaskSpec,
                cond: torch.Tensor | None, cache: KVCache | None, cache_write: bool,
                n_out: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, L, D) -> (B, n_out or L, D): with n_out only the first n_out positions are
        computed past the keys and values (the last block when only they are scored); with rows
        (N,), indices into the flattened (B * n_out) positions, only those rows past the
        attention, returned as (N, D) (the last block when only some positions are scored)."""
        n = h.shape[1] if n_out is None else n_out
        if self.modulation is not None:
            # (B or 1, 1 or L, D) each: shift/scale/gate of the attention and MLP branches
            mod = self.modulation(cond)
            if mod.shape[:2] == (1, 1):
                return self._forward_constant(h, mod.view(6, -1), cos, sin, mask, cache, cache_write, n, rows)
            s1, c1, g1, s2, c2, g2 = positions_of(mod, h.shape[1]).chunk(6, dim=-1)
            # addcmul(a, b, c) = a + b * c in one pass: modulate = shift + norm * (1 + scale)
            y = self._attention(torch.addcmul(s1, self.norm1(h), 1 + c1), cos, sin, mask, cache, cache_write, n,
                                rows=rows)
            s2, c2, g1, g2 = (modulation_rows(m, n, rows) for m in (s2, c2, g1, g2))
            h = torch.addcmul(take_rows(h[:, :n], rows), g1, y)
            y = self._mlp(torch.addcmul(s2, self.norm2(h), 1 + c2))
            return torch.addcmul(h, g2, y)
        h = take_rows(h[:, :n], rows) + self._attention(self.norm1(h), cos, sin, mask, cache, cache_write, n,
                                                         rows=rows)
        return h + self._mlp(self.norm2(h))

    def _forward_constant(self, h, mod, cos, sin, mask, cache, cache_write, n: int,
                          rows: torch.Tensor | None) -> torch.Tensor:
        """The block when one modulation (6, D) serves every row and position (the noise level not
        fed): the same function with the shift and scale as the LayerNorm's bias and weight and each
        gate scaling its branch's output layer, so that fused kernels do the work of the modulation."""
        s1, c1, g1, s2, c2, g2 = mod
        y = self._attention(modulated_norm(self.norm1, h, s1, c1), cos, sin, mask, cache, cache_write, n,
                            gate=g1, rows=rows)
        h = take_rows(h[:, :n], rows) + y
        return h + self._mlp(modulated_norm(self.norm2, h, s2, c2), gate=g2)

    def _attention(self, x, cos, sin, mask, cache, cache_write, n_out: int,
                   gate: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = rotary_qkv(self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads), cos, sin)
        if cache is not None:
            k, v = cache.keys_values(self.layer, k, v, cache_write)
        if n_out < L:
            q, mask = q[:, :, :n_out], first_queries(mask, n_out, L, k.shape[2], q.device)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, dropout)  # (B, H, n_out, hd)
        y = gated_linear(self.proj, take_rows(y.transpose(1, 2).reshape(B, n_out, D), rows), gate)
        return F.dropout(y, dropout, self.training) if dropout else y

    def _mlp(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = gated_linear(self.fc_out, F.gelu(self.fc(x), approximate="tanh"), gate)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


LOGIT_FLOOR = -1e4  # the logit of an id that is never emitted: exp(-1e4) is 0 in float32, unlike -inf
                   # it leaves entropies and p * log p finite


class Transformer(nn.Module):
    """tokens (B, L) -> logits (B, L, V) in float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.max_len <= 0:
            raise ValueError("ModelConfig.vocab_size and max_len must be set before building")
        if cfg.block == "auto":  # a RunConfig resolves auto from the method; alone it means plain
            cfg = dataclasses.replace(cfg, block="plain")
        self.cfg = cfg
        gated = cfg.block == "gated"
        conditioned = gated or cfg.time_conditioning
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        learned = cfg.positions == "learned"
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.dim) if learned else None
        self.rotary = None if learned else Rotary(cfg.head_dim, cfg.rope_base, 2 * cfg.max_len)  # past it: computed
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=gated and not cfg.tie_embeddings)
        if cfg.tie_embeddings:
            self.tie_weights()
        self.noise_embed = NoiseEmbedding(cfg.cond_dim) if conditioned else None
        self.final_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.dim) if conditioned else None
        self._init_gated() if gated else self._init_weights()

    def tie_weights(self) -> None:
        """The output layer reads the token embedding's matrix (after `.to_empty()` too). The state
        dict holds it once, as embed.weight (safetensors refuses two names for one tensor)."""
        self.head.weight = self.embed.weight
        if not getattr(self, "_tie_hooks", False):
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_restore_tied_head)
            self._tie_hooks = True

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts keep the tie: a move to or from the meta device makes new parameters."""
        out = super()._apply(fn, recurse)
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        return out

    def init_buffers(self) -> None:
        """Recompute the derived tables (rotary, noise frequencies) in place on the device they are
        on: after `.to_empty(device=...)` of a model built on the meta device (FSDP2), which leaves
        them uninitialised. They are not in the state dict, so loading weights does not set them."""
        init_buffers(self)

    def _init_gated(self) -> None:
        """adaLN-zero: every modulation starts at zero, so every block starts as the identity; the
        other weights as the plain block's (N(0, 0.02), residual projections scaled by depth).
        Measured on Austen (MDLM, quickstart config, valid bound after 250 steps): 3.36 bits with
        this init against 3.80 with PyTorch-default Linear init and a zero output layer."""
        self._init_weights()
        for layer in [block.modulation for block in self.blocks] + [self.final_modulation]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
                positions: torch.Tensor | None = None, logits_for: int | None = None,
                logits_at: torch.Tensor | None = None, embed_offset: torch.Tensor | None = None,
                hidden: bool = False) -> torch.Tensor:
        """tokens (B, L); sigma the noise level, (B,) or (B, K) with K | L (None: sigma = 0, the
        learned constant of a gated block); positions (L,) for RoPE (default: continue after the
        cache); logits_for = n scores only the first n positions (BD3-LM's x_t half); logits_at
        (B, n) bool scores only the positions it marks (a loss that reads only masked positions),
        returned as (N, V) in row-major order, the last block computing only them past its keys
        and values; embed_offset (B, L, D) is added to the token embeddings (EDLM's energy marks
        masked positions with it). Returns logits (B, L or n, V) float32, or with `hidden` the
        final normalised states (B, L or n, D) that the output layer would read."""
        B, L = tokens.shape
        offset = cache.length if cache is not None else 0  # a Python int: slicing reads no tensor
        cond = self.conditioning(sigma, B, tokens.device)  # (B or 1, K, cond_dim) or None
        h = self.embed(tokens)  # (B, L, D)
        if self.rotary is None:
            cos = sin = None
            h = h + self.position_embedding(offset, L, positions)
        else:
            cos, sin = self.rotary.span(offset, L) if positions is None else self.rotary.cos_sin(positions)
        if embed_offset is not None:
            h = h + embed_offset.to(h.dtype)
        # How many rows are scored depends on the mask drawn, so this is data-dependent by nature:
        # a host sync, and a graph break under torch.compile, paid only by losses that pass logits_at.
        rows = None if logits_at is None else logits_at.reshape(-1).nonzero().squeeze(1)
        whole = hasattr(mask, "mask_mod")  # a FlexAttention mask is kept whole
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            trim = i == last and not whole
            h = block(h, cos, sin, mask, cond, cache, cache_write, logits_for if trim else None,
                      rows if trim else None)
        n = L if logits_for is None else logits_for
        if whole:
            h = take_rows(h[:, :n], rows)
        h = self.final_norm(h, cond, L, n, rows)
        if cache is not None and cache_write:
            cache.advance(L)
        return h if hidden else self.output(h)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Final states (..., D) -> logits (..., V) float32, ids from output_vocab on floored."""
        logits = self.head(h).float()
        emitted = self.cfg.output_vocab
        if emitted and emitted < logits.shape[-1]:
            logits = F.pad(logits[..., :emitted], (0, logits.shape[-1] - emitted), value=LOGIT_FLOOR)
        return logits

    def position_embedding(self, offset: int, length: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Learned absolute positions: (L, D) for offset .. offset + L - 1, or for `positions` (L,)."""
        if positions is None:
            if offset + length > self.cfg.max_len:
                raise ValueError(f"positions up to {offset + length} exceed the model's {self.cfg.max_len} "
                                 "learned positions")
            return self.pos_embed.weight[offset:offset + length]
        return self.pos_embed(positions.to(self.pos_embed.weight.device))

    def final_norm(self, h: torch.Tensor, cond: torch.Tensor | None, L: int, n: int,
                   rows: torch.Tensor | None) -> torch.Tensor:
        """The output layer's input: the final LayerNorm of h (B, n, D) or its rows (N, D),
        modulated when the blocks are."""
        if self.final_modulation is None:
            return self.norm(h)
        if cond.shape[:2] == (1, 1):
            shift, scale = self.final_modulation(cond).view(2, -1)
            return modulated_norm(self.norm, h, shift, scale)
        shift, scale = modulation_rows(positions_of(self.final_modulation(cond), L), n, rows).chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(h), 1 + scale)

    def conditioning(self, sigma: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """SiLU(embed(sigma)) as (B, K, cond_dim); sigma None means 0 for every row, returned once
        as (1, 1, cond_dim); None when unconditioned."""
        if self.noise_embed is None:
            return None
        if sigma is None:  # one conditioning vector for every row (the blocks fold it into weights)
            return F.silu(self.noise_embed(torch.zeros(1, 1, device=device)))
        if sigma.dim() < 2:
            sigma = sigma.reshape(-1, 1)  # () or (B,) -> (1 or B, 1)
        return F.silu(self.noise_embed(sigma.expand(batch, -1)))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def _drop_tied_head(module: Transformer, state: dict, prefix: str, local_metadata) -> None:
    state.pop(prefix + "head.weight", None)


def _restore_tied_head(module: Transformer, state: dict, prefix: str, local_metadata, strict,
                       missing_keys, unexpected_keys, error_msgs) -> None:
    if prefix + "embed.weight" in state:
        state.setdefault(prefix + "head.weight", state[prefix + "embed.weight"])


def init_buffers(model: nn.Module) -> None:
    """Recompute every derived table of `model` (any module holding ddlm backbones, EDLM's
    composite included) in place: each submodule's `reset_buffers()`."""
    for module in model.modules():
        if callable(getattr(module, "reset_buffers", None)):
            module.reset_buffers()
