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


def measured_train_flops_per_token(loaded, *, rows: int = 2, seed: int = 0) -> float:
    """FLOPs of one training step (the method's loss, forward and backward) per trained token,
    counted by torch's FlopCounterMode on `rows` sequences of the run's length: what the method
    really spends (BD3's 2L pass, EDLM's proposals and energies), not a formula. Attention runs
    on SDPA's math kernel here, whose matmuls the counter sees (masked scores are counted)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ddlm.sampling.base import model_device

    method, model, run = loaded.method, loaded.model, loaded.run
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    high = min(run.model.vocab_size, loaded.tokenizer.vocab_size)
    x0 = torch.randint(0, max(1, high - 1), (rows, run.data.seq_len), generator=generator, device=device)
    was_training = model.training
    model.train()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = method.loss(model, x0, generator=generator)
            out.loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / x0.numel()
