"""The backbone's configuration, beside the network it describes (ddlm.config re-exports it)."""
from __future__ import annotations

from dataclasses import dataclass

from ddlm.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


BLOCKS = ("auto", "plain", "gated")
POSITIONS = ("rotary", "learned")


@dataclass
class ModelConfig:
    """The transformer backbone shared by every method."""

    dim: int = 256
    """Residual stream width D."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads H (dim must be divisible by n_heads)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of dim."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""
    rope_base: float = 10000.0
    """Base of the rotary position frequencies."""
    block: str = "auto"
    """auto (the method's default: gated for diffusion, plain for AR) | plain (pre-norm) |
    gated (adaLN-zero: zero-initialised gates, a learned constant when the noise is not fed in)."""
    cond_dim: int = 128
    """Width of the noise-level embedding (gated or time-conditioned blocks)."""
    vocab_size: int = 0
    """Set from the tokenizer; 0 until then."""
    max_len: int = 0
    """Context length; set from data.seq_len."""
    time_conditioning: bool = False
    """Set by the method: whether blocks are modulated by a noise level (adaLN)."""
    positions: str = "rotary"
    """rotary (RoPE in every attention) | learned (a table of max_len absolute position embeddings
    added to the token embeddings, as GPT-2)."""
    bias: bool = False
    """Plain block: biases in the attention and MLP linear maps (GPT-2); the gated block's MLP
    always has them."""
    tie_embeddings: bool = False
    """The output layer is the token embedding (GPT-2): one matrix, no output bias."""
    output_vocab: int = 0
    """When > 0, ids >= output_vocab are never emitted: their logits are floored (ddlm's mask and pad
    ids appended to an imported model's vocabulary). 0: every id is an output."""

    def __post_init__(self) -> None:
        _check(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
               f"model sizes must be positive (dim={self.dim}, n_layers={self.n_layers}, "
               f"n_heads={self.n_heads})")
        _check(self.dim % self.n_heads == 0,
               f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        _check((self.dim // self.n_heads) % 2 == 0,
               f"head size dim/n_heads={self.dim // self.n_heads} must be even for rotary positions")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.mlp_ratio > 0, f"model.mlp_ratio={self.mlp_ratio} must be positive")
        _check(self.rope_base > 0, f"model.rope_base={self.rope_base} must be positive")
        _check(self.cond_dim >= 1, f"model.cond_dim={self.cond_dim} must be >= 1")
        _check(self.block in BLOCKS, f"model.block={self.block!r} must be one of: {', '.join(BLOCKS)}")
        _check(self.positions in POSITIONS,
               f"model.positions={self.positions!r} must be one of: {', '.join(POSITIONS)}")
        _check(self.output_vocab >= 0 and (not self.vocab_size or self.output_vocab <= self.vocab_size),
               f"model.output_vocab={self.output_vocab} must be in [0, vocab_size={self.vocab_size}]")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
