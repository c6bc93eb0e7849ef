"""Attention masks and the key/value cache.

A mask is either a kind ("causal", "bidirectional"), a boolean tensor (Lq, Lk) or (B, 1, Lq, Lk)
with True where a query may attend to a key, or a FlexAttention BlockMask (optional sparse path). Builders for block-causal masks live here so every
method shares one definition.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MaskSpec = str | torch.Tensor | None  # or QueryGroups, or a FlexAttention BlockMask


def compile_flex() -> bool:
    """FlexAttention is fast only compiled; DDLM_FLEX_EAGER=1 runs it eagerly (for tests)."""
    return os.environ.get("DDLM_FLEX_EAGER", "") != "1"


def causal_mask(q_len: int, k_len: int | None = None, *, device=None) -> torch.Tensor:
    """(Lq, Lk) bool: query i (the last Lq of Lk positions) sees keys j <= offset + i."""
    k_len = q_len if k_len is None else k_len
    offset = k_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q


def block_causal_mask(length: int, block: int, *, device=None) -> torch.Tensor:
    """(L, L) bool: query i sees key j when block(j) <= block(i) (bidirectional within a block)."""
    blk = torch.arange(length, device=device) // block
    return blk[None, :] <= blk[:, None]


@functools.lru_cache(maxsize=16)
def block_diffusion_mask(length: int, block: int, device: str = "cpu") -> torch.Tensor:
    """(2L, 2L) bool mask of BD3-LM's vectorised pass over x_t (+) x_0 (Arriola et al. 2025, §3.2),
    blocks of `block` positions, b(i) = i // block:

        x_t query i -> x_t key j   b(j) == b(i)    block-diagonal: its own noisy block
        x_t query i -> x_0 key j   b(j) <  b(i)    offset block-causal: the clean prefix
        x_0 query i -> x_0 key j   b(j) <= b(i)    block-causal: clean blocks, as when cached
        x_0 query i -> x_t key j   never

    Built once per (length, block, device) and shared (read-only)."""
    blk = torch.arange(length, device=device) // block
    q, k = blk[:, None], blk[None, :]
    top = torch.cat([k == q, k < q], dim=1)
    bottom = torch.cat([torch.zeros_like(top[:, :length]), k <= q], dim=1)
    return torch.cat([top, bottom], dim=0)


@dataclass(frozen=True)
class QueryGroups:
    """A mask given as groups of queries, each attending over its own contiguous range of keys
    under its own boolean mask: (q_start, q_end, k_start, k_end, mask (Lq, Lk)). It equals the
    dense mask that is False outside the ranges, and skips their work (BD3-LM: clean queries never
    see noisy keys, a quarter of the dense 2L x 2L scores)."""

    groups: tuple[tuple[int, int, int, int, torch.Tensor], ...]

    def dense(self) -> torch.Tensor:
        """The equivalent dense boolean mask."""
        q_len = max(g[1] for g in self.groups)
        k_len = max(g[3] for g in self.groups)
        out = torch.zeros(q_len, k_len, dtype=torch.bool, device=self.groups[0][4].device)
        for q0, q1, k0, k1, mask in self.groups:
            out[q0:q1, k0:k1] = mask
        return out


@functools.lru_cache(maxsize=16)
def block_diffusion_groups(length: int, block: int, device: str = "cpu") -> QueryGroups:
    """`block_diffusion_mask` as QueryGroups: noisy queries over all 2L keys, clean queries over
    the L clean keys only."""
    mask = block_diffusion_mask(length, block, device)
    return QueryGroups(((0, length, 0, 2 * length, mask[:length]),
                        (length, 2 * length, length, 2 * length, mask[length:, length:])))


def flex_available() -> bool:
    """Whether the installed torch has FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def block_diffusion_block_mask(length: int, block: int, device: str = "cpu"):
    """`block_diffusion_mask` as a FlexAttention BlockMask (the optional sparse path; equal to the
    dense mask, which tests check element by element)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, k):
        q_noisy, k_noisy = q < length, k < length
        qb, kb = (q % length) // block, (k % length) // block
        return ((q_noisy & k_noisy & (kb == qb)) | (q_noisy & ~k_noisy & (kb < qb))
                | (~q_noisy & ~k_noisy & (kb <= qb)))

    return create_block_mask(visible, None, None, 2 * length, 2 * length, device=device)


@functools.lru_cache(maxsize=1)
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def prefix_block_mask(prefix: int, new: int, block: int, *, device=None) -> torch.Tensor:
    """(P + N, P + N) bool: P clean tokens block-causal among themselves (as cached), then N
    noisy tokens that see the whole clean prefix and each other. BD3-LM's sampler without a KV
    cache recomputes the prefix under this mask; with the cache it is the same attention."""
    total = prefix + new
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    mask[:prefix, :prefix] = block_causal_mask(prefix, block, device=device)
    mask[:prefix, prefix:] = False
    return mask


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding.

    `length` counts the positions stored. A forward pass with `cache_write=True` appends its keys
    and values; with `cache_write=False` its queries read the cache without storing anything.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, *,
                 dtype=torch.float32, device=None) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor, write: bool):
        """Return keys/values (B, H, P + Lq, hd) of the cache's P positions followed by the new ones.
        Whether they are kept (`write`) is decided by the forward pass advancing `length` or not."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.max_len}")
        # Without `write` the new keys go into the free slots after `length` as scratch (nothing
        # stored changes and `length` does not move), which saves concatenating the cache.
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in `rows` (a (B',) index), e.g. samples that have stopped."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def first_queries(mask: MaskSpec, n: int, q_len: int, k_len: int, device=None) -> MaskSpec:
    """The mask of only the first n of q_len queries (over k_len keys, the last q_len of which
    are the queries' own)."""
    if mask is None or (isinstance(mask, str) and mask == "bidirectional"):
        return mask
    if isinstance(mask, str):
        return causal_mask(q_len, k_len, device=device)[:n] if mask == "causal" else mask
    if isinstance(mask, QueryGroups):
        return QueryGroups(tuple((q0, min(q1, n), k0, k1, m[:min(q1, n) - q0])
                                 for q0, q1, k0, k1, m in mask.groups if q0 < n))
    if isinstance(mask, torch.Tensor):
        return mask[..., :n, :]
    raise ValueError(f"cannot keep the first {n} queries of a {type(mask).__name__} mask")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec,
           dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention; q (B, H, Lq, hd), k/v (B, H, Lk, hd) -> (B, H, Lq, hd)."""
    q_len, k_len = q.shape[2], k.shape[2]
    if hasattr(mask, "mask_mod"):  # a FlexAttention BlockMask
        return _flex_attention(compile_flex())(q, k, v, block_mask=mask)
    if isinstance(mask, QueryGroups):
        return torch.cat([F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                         attn_mask=m, dropout_p=dropout)
                          for q0, q1, k0, k1, m in mask.groups], dim=2)
    if mask is None or (isinstance(mask, str) and mask == "bidirectional"):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask kind {mask!r}")
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if q_len == 1:  # a single new query sees every stored key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        mask = causal_mask(q_len, k_len, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
