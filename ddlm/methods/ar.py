"""Autoregressive baseline: next-token NLL under a causal mask.

Every one of the L tokens of a block is scored: the input is [BOS, x_1 .. x_{L-1}] and the
target x_1 .. x_L, so AR and diffusion methods count the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, Method, MethodConfig, NLLBound, counted_weights, register


@dataclass
class ARConfig(MethodConfig):
    """The AR method has no options of its own."""


@register
class AR(Method):
    name = "ar"
    likelihood_source = "AR below every diffusion bound: MDLM Table 1, BD3-LM Table 3, SEDD Table 1"
    config_class = ARConfig
    attention = "causal"
    samplers = ("ancestral",)
    has_steps = False

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        return 0.0

    def shifted_input(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L): BOS followed by all tokens but the last."""
        bos = torch.full_like(x0[:, :1], self.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def logits(self, model, tokens: torch.Tensor, *, cache=None) -> torch.Tensor:
        """The one network call: next-token logits (B, L, V) under the causal mask; with a KV
        cache the tokens continue the cached prefix."""
        return model(tokens, mask="causal", cache=cache)

    def token_nll(self, model, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) float32: -log p(x_i | x_<i) in nats."""
        logits = self.logits(model, self.shifted_input(x0))  # (B, L, V)
        return F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")

    def loss(self, model, x0, *, t=None, loss_mask=None, generator=None) -> LossOutput:
        nll = self.token_nll(model, x0)
        weights = torch.ones_like(nll) if loss_mask is None else loss_mask.to(nll.dtype)
        nll = nll * weights
        return LossOutput(loss=nll.sum() / weights.sum().clamp_min(1), token_nll=nll, weights=weights)

    @torch.no_grad()
    def nll_bound(self, model, x0, *, n_samples=1, loss_mask=None, given=None, generator=None) -> NLLBound:
        """The exact NLL of the counted tokens; with a `given` prefix (B, L) it is the exact
        -log p(continuation | prefix): the prefix is read through the causal mask and not counted."""
        out = self.loss(model, x0, loss_mask=loss_mask)
        nll, weights = out.token_nll.double(), out.weights.double()
        if given is not None:
            if (given[:, 1:] & ~given[:, :-1]).any():
                raise ConfigError("AR conditions on a prefix only: `given` must mark the first positions of each row")
            nll, weights = nll.masked_fill(given, 0.0), counted_weights(x0, weights, given)
        return NLLBound(nll=nll.sum(1), tokens=weights.sum(1), exact=True)

    def sampler(self, cfg):
        from ddlm.sampling.ar import ARSampler

        self.sampler_name(cfg)
        return ARSampler(self, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         use_cache=cfg.cache, stride=cfg.stride)
