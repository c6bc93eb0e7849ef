"""BD3-LM sampling: blocks left to right, each denoised by an MDLM sampler given the clean prefix.

For every block of L' positions:
  1. an inner MDLM sampler (ancestral with the no-change cache, or first-hitting) fills the
     block's MASKs; its network calls see the block and the clean prefix (`PrefixModel`);
  2. the finished block is written to the KV cache with one more pass in which it sees the clean
     prefix and itself: exactly the keys and values of the x_0 half of training
     (`block_diffusion_mask`), so the cache is exact by the mask's design.
Without the KV cache every call recomputes the whole prefix under `prefix_block_mask` (the
reference the cache is tested against).

Rows are independent: rows draw from their own generators when given one per row
(`sampling.base.uniform`), and a row that stops (EOS, or a degenerate tail whose unigram entropy
over the last `entropy_window` tokens falls below `stop_entropy` nats) leaves the batch; its
remaining positions are PAD and `Generation.lengths` says where it ended. Past the model's context
the window slides by whole blocks: the newest `context - stride` clean tokens are re-encoded at
positions 0.. into a fresh cache.
"""
from __future__ import annotations

import math
import time

import torch

from ddlm.errors import ConfigError
from ddlm.nn.attention import block_causal_mask, prefix_block_mask
from ddlm.sampling.base import Generation, Sampler, expand_rows, model_device, prompt_rows


class PrefixModel:
    """The backbone as an MDLM sampler sees it while it fills one block: each call also reads the
    clean prefix, from the KV cache or by recomputing it. `append` adds a finished block."""

    def __init__(self, model, block_size: int, prefix: torch.Tensor, *, use_cache: bool) -> None:
        self.model, self.block_size = model, block_size
        self.cache = model.new_cache(prefix.shape[0]) if use_cache else None
        self.prefix = prefix[:, :0]
        self.passes = 0  # network passes spent on the prefix (cache writes)
        if prefix.shape[1]:
            self.append(prefix)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens: torch.Tensor, *, sigma=None, cache=None, **kw) -> torch.Tensor:
        kw.pop("mask", None)  # the block sees the whole clean prefix and itself
        if self.cache is not None:
            return self.model(tokens, sigma=sigma, mask="bidirectional", cache=self.cache,
                              cache_write=False, **kw)
        P, N = self.prefix.shape[1], tokens.shape[1]
        if sigma is not None:  # the clean prefix has noise level 0
            sigma = torch.cat([torch.zeros_like(sigma[:, :1]).expand(-1, P),
                               sigma.reshape(sigma.shape[0], -1).expand(-1, N)], dim=1)
        at = kw.pop("logits_at", None)  # (B, N): positions of the block; none of the prefix
        if at is not None:
            at = torch.cat([at.new_zeros(at.shape[0], P), at], dim=1)
        mask = prefix_block_mask(P, N, self.block_size, device=tokens.device)
        logits = self.model(torch.cat([self.prefix, tokens], dim=1), sigma=sigma, mask=mask,
                            positions=torch.arange(P + N, device=tokens.device), logits_at=at, **kw)
        return logits[:, P:] if logits.dim() == 3 else logits  # all positions, or the rows at `at`

    def append(self, block: torch.Tensor) -> None:
        """Add clean tokens (whole blocks) after the prefix; with the cache, one pass writes their
        keys and values (block-causal among themselves, as the x_0 half of training)."""
        if self.cache is not None:
            mask = block_causal_mask(block.shape[1], self.block_size, device=block.device)
            if self.cache.length:
                seen = torch.ones(block.shape[1], self.cache.length, dtype=torch.bool, device=block.device)
                mask = torch.cat([seen, mask], dim=1)
            self.model(block, mask=mask, cache=self.cache, cache_write=True)
            self.passes += 1
        self.prefix = torch.cat([self.prefix, block], dim=1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.prefix = self.prefix[rows]
        if self.cache is not None:
            self.cache.keep_rows(rows)


class BlockSampler(Sampler):
    """BD3-LM's sampler: `inner` (an MDLM sampler built on the BD3 method) fills one block at a
    time. NFE counts every network pass: the inner sampler's and the cache writes."""

    variable_length = True

    def __init__(self, method, inner: Sampler, *, use_kv_cache: bool = True, stride: int = 0,
                 stop_eos: bool = False, stop_entropy: float = 0.0, entropy_window: int = 256) -> None:
        super().__init__(method, temperature=inner.temperature, top_k=inner.top_k, top_p=inner.top_p,
                         stride=stride)
        self.inner, self.use_kv_cache = inner, use_kv_cache
        self.stop_eos, self.stop_entropy, self.entropy_window = stop_eos, stop_entropy, entropy_window

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 template: torch.Tensor | None = None, generator=None) -> Generation:
        """(n, Lp + length) tokens: the prompt, then `length` new ones (PAD after a row's end).
        A template (n, L) is filled block by block in the same order: each block's MASKs see the
        text before the block and the given tokens of the block itself, never text after it."""
        self.check_request(prompt, template)
        begin = time.perf_counter()
        if template is not None:
            start = expand_rows(template.to(model_device(model)), n, "template")
            length, Lp = 0, first_masked_column(start, self.method.mask_id)
        else:
            start = prompt_rows(prompt, n, model_device(model))
            Lp = start.shape[1]
        Lb = self.method.block_size
        goal = start.shape[1] + length
        if template is not None and goal > (self.context or goal):
            raise ConfigError(f"the template is {goal} tokens, longer than the model's context of {self.context}")
        context = self.context or getattr(getattr(model, "cfg", None), "max_len", 0) or math.ceil(goal / Lb) * Lb
        keep = self.kept_tokens(context)
        seq = self.masked_after(start, math.ceil(goal / Lb) * Lb - start.shape[1])  # whole blocks
        lengths = torch.full((n,), goal, dtype=torch.long, device=seq.device)
        rows = torch.arange(n, device=seq.device)  # rows still generating
        clean = Lp // Lb * Lb  # whole blocks of the prompt are clean prefix
        window = clean - keep if clean + Lb > context else 0  # where position 0 of the cache is
        prefix = PrefixModel(model, Lb, seq[:, window:clean], use_cache=self.use_kv_cache)
        nfe = 0
        self.inner.recorder = self.recorder
        if self.recorder is not None:
            self.recorder.start(seq[:, :goal])
        for b0 in range(clean, seq.shape[1], Lb):
            if b0 - window + Lb > context:  # slide: re-encode the newest `keep` clean tokens
                nfe += prefix.passes
                window = b0 - keep
                prefix = PrefixModel(model, Lb, seq[rows, window:b0], use_cache=self.use_kv_cache)
            if self.recorder is not None:
                self.recorder.window(b0, rows, nfe_before=nfe + prefix.passes)
            block, used = self.inner.fill(prefix, seq[rows, b0:b0 + Lb], self.row_subset(generator, rows))
            seq[rows, b0:b0 + Lb] = block
            nfe += used
            stopped = self.stops(seq[rows, :min(b0 + Lb, goal)], Lp, lengths, rows) if template is None \
                else torch.zeros(len(rows), dtype=torch.bool, device=seq.device)
            if b0 + Lb >= seq.shape[1] or stopped.all():
                break
            if stopped.any():
                rows = rows[~stopped]
                prefix.keep_rows(~stopped)
            prefix.append(seq[rows, b0:b0 + Lb])
        nfe += prefix.passes
        tokens = seq[:, :goal]
        ended = torch.arange(goal, device=seq.device)[None, :] >= lengths[:, None]
        tokens = tokens.masked_fill(ended, self.method.pad_id)
        variable = (self.stop_eos or self.stop_entropy > 0) and template is None
        if self.recorder is not None:
            self.recorder.finish(tokens, nfe)
        return Generation(tokens, nfe, time.perf_counter() - begin, lengths if variable else None)

    def kept_tokens(self, context: int) -> int:
        """Clean tokens kept when the window slides: context - stride, rounded down to whole
        blocks (default stride: half the context)."""
        Lb = self.method.block_size
        if context % Lb:
            raise ConfigError(f"the model's context {context} is not a multiple of the block size {Lb}")
        stride = self.stride or context // 2
        if not 0 < stride <= context:
            raise ConfigError(f"sample.stride={stride} must be in 1..context={context}")
        return max(0, (context - stride) // Lb * Lb)

    @staticmethod
    def row_subset(generator, rows: torch.Tensor):
        """The generators of the rows still generating (a single generator is shared)."""
        if isinstance(generator, (list, tuple)):
            return [generator[i] for i in rows.tolist()]
        return generator

    def stops(self, seq: torch.Tensor, prompt_len: int, lengths: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
        """(R,) bool: rows of seq (R, T), cut at the requested length, that end now; their lengths
        are written into `lengths`.
        EOS: the row ends after its first generated EOS. Entropy: the unigram entropy (nats) of
        the last `entropy_window` generated tokens is below `stop_entropy`; that tail is cut."""
        R, T = seq.shape
        stopped = torch.zeros(R, dtype=torch.bool, device=seq.device)
        if self.stop_eos:
            eos = seq[:, prompt_len:] == self.method.bos_id
            hit = eos.any(1)
            first = eos.int().argmax(1) + prompt_len + 1
            lengths[rows[hit]] = first[hit]
            stopped |= hit
        k = self.entropy_window
        if self.stop_entropy > 0 and T - prompt_len >= k:
            low = unigram_entropy(seq[:, T - k:]) < self.stop_entropy
            fresh = low & ~stopped
            lengths[rows[fresh]] = T - k
            stopped |= low
        return stopped


def unigram_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """(R,) entropy in nats of the empirical distribution of each row's tokens."""
    counts = torch.zeros(tokens.shape[0], int(tokens.max()) + 1, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float64))
    p = counts / tokens.shape[1]
    return -(p * p.clamp_min(1e-300).log()).sum(1)


def first_masked_column(rows: torch.Tensor, mask_id: int) -> int:
    """The first position at which any row has a MASK (the row length when none has)."""
    masked = (rows == mask_id).any(0).nonzero()
    return int(masked[0]) if masked.numel() else rows.shape[1]
