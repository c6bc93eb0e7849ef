"""Model FLOPs for MFU: the count a training step must do, against a measured matmul rate."""
from __future__ import annotations

from ddlm.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply every token (attention, MLP and the output head). The adaLN modulation
    is computed once per sequence (or per block), not per token, so it is not counted."""
    hidden = int(cfg.mlp_ratio * cfg.dim)
    per_block = 3 * cfg.dim * cfg.dim + cfg.dim * cfg.dim + 2 * cfg.dim * hidden
    return cfg.n_layers * per_block + cfg.dim * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N (forward + backward of every weight) + 12 layers * L * D for attention scores and values
    (the PaLM count; causal masking is not discounted)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * seq_len * cfg.dim
