"""SEDD: score-entropy discrete diffusion (Lou et al. 2024), absorbing and uniform graphs.

The backbone's logits parameterise log concrete scores, s_theta(x_t, t)_{l,y} ~ p_t(x_t with
x_t,l = y) / p_t(x_t), for every one-token neighbour y of x_t. Absorbing graph (SEDD code):
    log s = logits - log expm1(sigma_bar) - log(n_tokens),
so that a softmax output p_theta gives the scores p_theta / expm1(sigma_bar) of MDLM's denoiser.
Uniform graph: log s = logits. Ids outside the graph and y = x_t get no score.

Denoising score entropy at position l (SEDD eq. 9, weights Q(x_t, y) of the graph):
    DSE_l = sum_{y != x_t} Q(x_t, y) [ s_y - r_y log s_y + K(r_y) ],   K(a) = a (log a - 1),
    r_y = p_{t|0}(y | x0) / p_{t|0}(x_t | x0),
which is >= 0 and = 0 iff s_y = r_y. Likelihood bound (SEDD Thm 3.6), per sequence:
    -log p(x0) <= int_0^1 sigma(t) E_{x_t} [ sum_l DSE_l ] dt + sum_l KL(p_{1|0}(. | x0_l) || p_base),
estimated with stratified t (as MDLM) and accumulated in float64. For the absorbing graph with
softmax scores, sigma(t) DSE_l equals MDLM's per-token loss w(t) (-log p_theta(x0_l)) exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import register
from ddlm.methods.noise import DiffusionMethod, NoiseConfig, keep_given
from ddlm.process.graphs import GRAPHS, Absorbing, Graph, build_graph
from ddlm.sampling.score import PREDICTORS


@dataclass
class SEDDConfig(NoiseConfig):
    """Options of SEDD (`--sedd.<field>=value`); SEDD's code uses geometric noise for uniform."""

    graph: str = "absorbing"
    """Forward process: absorbing (to MASK) | uniform (to any token)."""
    time_conditioning: bool = True
    """Give the backbone sigma_bar(t) (adaLN), as SEDD's DiT does."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_all("sedd", [
            (self.graph in GRAPHS, f"sedd.graph={self.graph!r} must be one of: {', '.join(GRAPHS)}"),
        ])


def score_entropy(log_score: torch.Tensor, ratio: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_y w_y [ s_y - r_y log s_y + K(r_y) ] over the last axis; (..., V) -> (...).

    Terms with w_y = 0 are dropped (their scores may be -inf); r log s = 0 and K(r) = 0 at r = 0.
    """
    live = weight > 0
    log_s = torch.where(live, log_score, torch.zeros_like(log_score))
    r = torch.where(live, ratio, torch.zeros_like(ratio))
    reached = r > 0
    k = torch.where(reached, r * (torch.log(r.clamp_min(1e-300)) - 1), torch.zeros_like(r))
    r_log_s = torch.where(reached, r * log_s, torch.zeros_like(r))
    terms = torch.exp(log_s) - r_log_s + k
    return (weight * torch.where(live, terms, torch.zeros_like(terms))).sum(-1)


@register
class SEDD(DiffusionMethod):
    name = "sedd"
    config_class = SEDDConfig
    bound_name = "DSE integral + prior KL (SEDD Thm 3.6)"
    samplers = PREDICTORS
    likelihood_source = "SEDD Table 1: the absorbing graph below the uniform one"

    @classmethod
    def variant(cls, options: dict) -> str:
        return f"sedd-{options.get('graph', 'absorbing')}"

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        return 3.0 if options.get("graph", "absorbing") == "absorbing" else 4.0

    def __init__(self, cfg: SEDDConfig, *, vocab_size: int, mask_id: int, bos_id: int,
                 pad_id: int, context: int = 0) -> None:
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id, bos_id=bos_id, pad_id=pad_id,
                         context=context)
        self.graph: Graph = build_graph(cfg.graph, vocab_size, mask_id)

    def set_never_emitted(self, ids) -> None:
        """The graph's states leave them out (log(V - 1) in the absorbing scores counts only the rest)."""
        super().set_never_emitted(ids)
        self.graph = build_graph(self.cfg.graph, self.vocab_size, self.mask_id, self.never_emitted)

    # ---- the one network call ------------------------------------------------------------

    def log_score(self, model, xt: torch.Tensor, t: torch.Tensor, *,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(B, L, V) log s_theta(x_t, t) in `dtype`; t (B, 1) or (B, L); -inf at y = x_t and outside
        the graph."""
        sigma_bar = self.schedule.total_noise(t.to(torch.float64))
        sigma = sigma_bar.float() if self.time_conditioned else None
        logits = model(xt, sigma=sigma, mask="bidirectional")  # (B, L, V)
        return self.scores_from_logits(logits, xt, sigma_bar, dtype=dtype)

    def scores_from_logits(self, logits: torch.Tensor, xt: torch.Tensor, sigma_bar: torch.Tensor, *,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(B, L, V) log s_theta from plain logits in `dtype` (at least float32; logits are upcast);
        sigma_bar (B, 1) or (B, L)."""
        log_s = logits.to(torch.promote_types(logits.dtype, dtype))
        if isinstance(self.graph, Absorbing):
            offset = torch.log(torch.expm1(sigma_bar.to(log_s.dtype))) + math.log(self.graph.n_tokens)
            log_s = log_s - offset[..., None]
        allowed = self.graph.member.to(log_s.device) & ~torch.nn.functional.one_hot(
            xt, self.vocab_size).bool()
        return log_s.masked_fill(~allowed, float("-inf"))

    def position_dse(self, model, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, *,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(B, L) denoising score entropy of every position (0 where no rate flows in), in dtype."""
        log_s = self.log_score(model, xt, t, dtype=dtype)
        sigma_bar = self.schedule.total_noise(t.to(torch.float64))
        p = self.graph.transition(x0, sigma_bar, dtype=log_s.dtype)  # (B, L, V) p_{t|0}(y|x0)
        ratio = p / p.gather(-1, xt[..., None])
        return score_entropy(log_s, ratio, self.graph.rate_into(xt, dtype=log_s.dtype))

    def sampled_nll(self, model, x0: torch.Tensor, t: torch.Tensor, generator=None, *,
                    dtype: torch.dtype = torch.float64, given=None) -> torch.Tensor:
        """(B, L): sigma(t) DSE_l at x_t ~ p_{t|0}(. | x0); t (B, 1) or (B, L). `given` positions
        stay x0: no rate flows into them under the conditional process, so nll_bound drops their
        terms and prior (absorbing: an unmasked position's DSE is 0 anyway; uniform: it is not, as
        the score of changing a clean token is still defined)."""
        t = t.to(torch.float64)
        sigma_bar = self.schedule.total_noise(t)
        xt = keep_given(x0, self.graph.corrupt(x0, sigma_bar.expand(x0.shape), generator), given)
        rate = self.schedule.rate(t)
        return rate.to(dtype) * self.position_dse(model, x0, xt, t, dtype=dtype)

    def prior_nll(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) KL(p_{1|0}(. | x0_l) || p_base) of every position."""
        one = torch.ones((), dtype=torch.float64, device=x0.device)
        return self.graph.prior_kl(x0, self.schedule.total_noise(one))

    def sampler(self, cfg):
        """The SEDD sampler for a SampleConfig (cfg.sampler: '' | analytic | euler)."""
        from ddlm.sampling.score import ScoreSampler

        predictor = self.sampler_name(cfg)
        if cfg.top_k or cfg.top_p < 1.0:
            raise ConfigError("sedd samplers take --temperature but not top-k/top-p (scores are not "
                              "a distribution over tokens)")
        if cfg.noise_removal != "draw":
            raise ConfigError("sedd samplers end with an analytic denoising step; "
                              "--sample.noise_removal applies to mdlm only")
        return ScoreSampler(self, steps=cfg.steps, predictor=predictor, t_min=cfg.t_min,
                            temperature=cfg.temperature, stride=cfg.stride)
