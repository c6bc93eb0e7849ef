"""The configuration of a ddlm model exported to a Hugging Face folder (`ddlm export DIR --to hf OUT`).

It holds the backbone's shape (ddlm's ModelConfig), the method and its options (noise schedule,
graph, block size), the special token ids and the run's sampling defaults, so that
`modeling_ddlm.py` can rebuild the network, its parameterisation and its sampler without ddlm.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class DdlmConfig(PretrainedConfig):
    """A ddlm run: backbone, method and sampling defaults."""

    model_type = "ddlm"

    method: str = "mdlm"
    """ar | mdlm | sedd | bd3"""
    dim: int = 256
    """Residual stream width D."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads H."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies."""
    block: str = "gated"
    """plain (pre-norm) | gated (adaLN-zero)."""
    cond_dim: int = 128
    """Width of the noise-level embedding."""
    vocab_size: int = 0
    """Ids V, ddlm's specials included."""
    max_len: int = 0
    """Context length L."""
    time_conditioning: bool = False
    """Whether the noise level reaches the blocks (adaLN)."""
    positions: str = "rotary"
    """rotary (RoPE in every attention) | learned (absolute position embeddings)."""
    bias: bool = False
    """Plain block: biases in the attention and MLP linear maps."""
    tie_embeddings: bool = False
    """The output layer is the token embedding."""
    output_vocab: int = 0
    """When > 0, ids >= output_vocab get the floor logit."""
    output_floor: float = -1e4
    """The logit given to ids >= output_vocab."""
    mask_id: int = 0
    """The absorbing MASK id."""
    method_options: dict | None = None
    """The method's own options (ddlm's --<method>.* section)."""
    sample_defaults: dict | None = None
    """The run's sampling options (ddlm's --sample.* section)."""
    ddlm_version: str = ""
    """The ddlm commit that wrote the folder."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
