"""EDLM: energy-based diffusion language models (Xu et al., ICLR 2025).

A frozen MDLM denoiser p_theta(x_0 | x_t), factorised over positions, is corrected at the level of
the whole sequence by an energy E(x_0, x_t, t) (lower = more likely), a residual EBM per step:

    p_phi(x_0 | x_t)  =  p_theta(x_0 | x_t) exp(-E(x_0, x_t, t)) / Z(x_t).

Energies (`--edlm.energy`):
  ar:DIR    a trained ddlm AR model: E = -log p_AR(x_0) + log p_theta(x_0 | x_t), so p_phi is the
            AR model restricted to the completions of x_t. With `carry_over` only the masked
            positions are scored by the AR model (coAR): sum_{l masked} log p_AR(x_l | x_<l), which
            is itself normalised over the completions of x_t.
  nce       a bidirectional transformer initialised from the MDLM weights, reading x_0 with the
            masked positions of x_t marked, summing a per-position score over them (zero when
            nothing is masked); trained by noise-contrastive estimation against `negatives`
            draws x_0^- ~ p_theta(. | x_t) from the frozen denoiser (binary NCE with noise ratio
            nu = negatives, Gutmann & Hyvarinen 2010):
                loss = softplus(E(x_0^+) + log nu) + sum_j softplus(-E(x_0^-_j) - log nu),
            whose minimiser is -E = log p_data(x_0 | x_t) / p_theta(x_0 | x_t) (nu = 1: the paper's
            -log sigma(-E+) - log sigma(E-)).

Sampling (`ddlm/sampling/importance.py`, docs/methods.md §6.2.2): inside the window
t in [1 - window, 1], k proposals from the denoiser, self-normalised weights exp(-E) in float64
per row, one resampled x_0* per row, then MDLM's posterior step with x_0*; plain MDLM outside the
window.

Temperature tau, top-k and top-p act on the step's target, the residual EBM: the importance step
targets p_phi(x_0 | x_t)^(1/tau) restricted to S, the product over masked positions of the tokens
that top-k / top-p keep of the tempered denoiser (the sets MDLM's own nucleus sampling keeps).
Proposals come from that filtered denoiser q, which is proportional to p_theta^(1/tau) on S, so the
weights are exp(-E / tau) (`proposal_log_weights`); outside the window the step is MDLM's with the
filtered denoiser (E = 0). With an AR energy the target is p_AR^(1/tau) on S: a sequence-level
temperature, not the AR sampler's per-token one.

Likelihood (docs/methods.md §6.2.3-6.2.5): what the sampler draws from is the sampling-importance-
resampling law with k proposals, p_k(x_0 | x_t) = q(x_0) E[k w(x_0) / (w(x_0) + sum_{j=2..k} w(x^j))],
w = exp(-E), x^j ~ q. The continuous-time NELBO of a joint denoiser needs only its one-position
marginals, so the bound reported is MDLM's with -log x_theta[x_l] replaced by -log p_k(x_l | x_t):

    B_k(x) = prior + int_0^1 w(t) E_{x_t} sum_{l masked} [ -log x_theta(x_t)_l[x_l] - 1{t >= 1-window} log rho_k(l, x_t) ] dt,
    rho_k(l, x_t) = E[ k w(x^1) / (w(x^1) + sum_{j>=2} w(x^j)) ],  x^1 ~ q with x^1_l := x_l.

It is a true upper bound on -log p_k(x) for every energy (k = 1 gives MDLM's bound exactly).
rho_k is estimated by `bound_draws` Monte-Carlo draws and one masked position per sequence and
t-sample (scaled by the count of masked positions): -log of an unbiased estimate is biased up
(Jensen), so the reported figure over-states the bound in expectation (conservative).

The paper's likelihood (EDLM §4.3, Thm. 1: the MDLM weight times -log p_phi(x_masked | x_t), log Z
estimated from k proposals with a leave-one-out correction) is not offered: even with the exact
log Z that joint plug-in is not a bound (its mean falls below the entropy, docs/methods.md §6.2.4).
`edlm.bound=joint` is refused in one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddlm.errors import ConfigError
from ddlm.methods.base import LossOutput, NLLBound, counted_weights, register
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.noise import keep_given
from ddlm.nn.transformer import Transformer
from ddlm.sampling.base import Generators, gumbel_argmax

BOUNDS = ("sir",)


@dataclass
class EDLMConfig(MDLMConfig):
    """Options of EDLM (`--edlm.<field>=value`); MDLM's options describe the frozen denoiser.
    k, window, carry_over, bound and bound_draws may be changed at sample / eval time."""

    energy: str = "nce"
    """nce (train an energy network by NCE; a trained EDLM run uses its own) | ar:DIR (a ddlm AR
    run) | nce:DIR (the energy of a trained EDLM-NCE run)."""
    carry_over: bool = False
    """AR energy: score only the masked positions with the AR model (coAR)."""
    k: int = 4
    """Proposals per importance-sampling step (1: plain MDLM)."""
    window: float = 1.0
    """Importance sampling for t in [1 - window, 1] (1: every step; 0: never)."""
    negatives: int = 1
    """NCE training only: negatives drawn from the frozen denoiser per positive."""
    bound: str = "sir"
    """ddlm eval: sir, the NELBO of the k-proposal sampler (an upper bound); the paper's joint
    plug-in (joint) was removed: it is not a bound."""
    bound_draws: int = 64
    """Monte-Carlo draws per rho_k estimate in the bound (k of the energy's passes each); the
    upward bias shrinks as 1/draws and is large when the weights are heavy-tailed (measured with an
    AR energy on a Markov chain: 16.9 / 1.71 / 1.22 bits per token at 1 / 8 / 64 draws)."""

    def validate(self) -> None:
        self.check_all("edlm", [
            (self.discrete_steps == 0, "edlm.discrete_steps is not supported; EDLM's bound is continuous-time"),
            (self.full_window, "edlm.clip_min/clip_max/search_every are not supported; train the denoiser "
                               "with them as an MDLM run"),
            (self.energy == "nce" or (self.energy.startswith(("ar:", "nce:")) and bool(self.energy_path)),
             f"edlm.energy={self.energy!r} must be nce, ar:DIR or nce:DIR (DIR a run directory)"),
            (self.k >= 1, f"edlm.k={self.k} must be >= 1"),
            (0.0 <= self.window <= 1.0, f"edlm.window={self.window} must be in [0, 1]"),
            (self.negatives >= 1, f"edlm.negatives={self.negatives} must be >= 1"),
            (self.bound != "joint", "edlm.bound=joint was removed: the paper's joint plug-in is not a bound "
                                    "(docs/methods.md §6.2.4); use edlm.bound=sir"),
            (self.bound in BOUNDS, f"edlm.bound={self.bound!r} must be one of: {', '.join(BOUNDS)}"),
            (self.bound_draws >= 1, f"edlm.bound_draws={self.bound_draws} must be >= 1"),
        ])

    @property
    def energy_kind(self) -> str:
        return self.energy.partition(":")[0]

    @property
    def energy_path(self) -> str:
        return self.energy.partition(":")[2]


# ---- energies ---------------------------------------------------------------------------------

class AREnergy(nn.Module):
    """E(x_0, x_t) = -log p_AR(x_0) + log p_theta(x_0 | x_t), p_theta the denoiser (log_q: its
    log-probability, up to a function of x_t alone, which the self-normalised weights do not see);
    with carry_over only the positions masked in x_t are scored by the AR model. Frozen: it is
    never trained here."""

    def __init__(self, ar_model: nn.Module, *, bos_id: int, mask_id: int, carry_over: bool) -> None:
        super().__init__()
        self.model, self.bos_id, self.mask_id, self.carry_over = ar_model, bos_id, mask_id, carry_over
        self.model.requires_grad_(False)

    def forward(self, x0: torch.Tensor, zt: torch.Tensor, sigma=None, *, log_q: torch.Tensor) -> torch.Tensor:
        """(N,) float64."""
        return -self.log_prob(x0, zt) + log_q.double()

    def log_prob(self, x0: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """(N,) float64: log p_AR(x_0), or with carry_over sum_{l masked in zt} log p_AR(x_l | x_<l)."""
        shifted = torch.cat([torch.full_like(x0[:, :1], self.bos_id), x0[:, :-1]], dim=1)
        logp = torch.log_softmax(self.model(shifted, mask="causal").double(), dim=-1)
        token = logp.gather(-1, x0[..., None]).squeeze(-1)  # (N, L)
        if self.carry_over:
            token = torch.where(zt == self.mask_id, token, torch.zeros_like(token))
        return token.sum(1)


class NCEEnergy(nn.Module):
    """A bidirectional transformer reading x_0 with the masked positions of x_t marked (a learned
    embedding added there), E = sum over masked positions of a linear score of the final states.
    The mark and the score start at zero, so an untrained energy is 0 (plain MDLM)."""

    def __init__(self, model_cfg, *, mask_id: int) -> None:
        super().__init__()
        self.backbone = Transformer(model_cfg)
        self.backbone.head = nn.Identity()  # the energy reads the final states, not logits
        self.mask_id = mask_id
        self.mark = nn.Parameter(torch.zeros(model_cfg.dim))
        self.score = nn.Linear(model_cfg.dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, x0: torch.Tensor, zt: torch.Tensor, sigma=None, *, log_q=None) -> torch.Tensor:
        """(N,) float32 energies."""
        masked = (zt == self.mask_id)
        h = self.backbone(x0, sigma=sigma, mask="bidirectional", hidden=True,
                          embed_offset=masked[..., None] * self.mark)  # (N, L, D)
        per_position = self.score(h).squeeze(-1).float()  # (N, L)
        return (per_position * masked).sum(1)


class EDLMModel(nn.Module):
    """The composite EDLM trains and samples with: a frozen denoiser and an energy."""

    def __init__(self, denoiser: nn.Module, energy: nn.Module) -> None:
        super().__init__()
        self.denoiser, self.energy = denoiser, energy
        self.denoiser.requires_grad_(False)


# ---- the method -------------------------------------------------------------------------------

@register
class EDLM(MDLM):
    name = "edlm"
    config_class = EDLMConfig
    samplers = ("importance", "ancestral")
    validation = "loss"  # training validates the NCE loss; `ddlm eval` computes the bound
    wraps = ("mdlm",)  # `ddlm sample MDLM_DIR --edlm.energy ar:AR_DIR` builds EDLM around it
    sample_options = ("energy", "carry_over", "k", "window", "bound", "bound_draws")
    needs_init = "an MDLM run, whose denoiser EDLM freezes and whose weights start the energy"

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        return None  # its bound is the importance sampler's; the papers' EDLM figures are not bounds

    def __init__(self, cfg, **kw) -> None:
        super().__init__(cfg, **kw)
        self.energy_module: nn.Module | None = None  # an energy loaded from another run (ar:, nce:)
        self.energy_denoiser: dict | None = None  # the denoiser an nce:DIR energy was trained with
        self.for_inference = False  # set by load_parts: built for sampling or eval, not training

    @property
    def bound_name(self) -> str:  # type: ignore[override]
        return (f"upper bound: NELBO of the k={self.cfg.k} importance sampler in window {self.cfg.window} (continuous "
                f"time, one-position marginals) + prior KL; rho_k from {self.cfg.bound_draws} draw(s), "
                f"biased up (conservative)")

    # ---- the model: a frozen denoiser and an energy --------------------------------------------

    def build_model(self, model_cfg) -> EDLMModel:
        if self.energy_module is not None:
            return EDLMModel(Transformer(model_cfg), self.energy_module)
        if self.cfg.energy != "nce":
            raise ConfigError(f"edlm.energy={self.cfg.energy!r} is loaded at sample or eval time; "
                              f"train with edlm.energy=nce")
        return EDLMModel(Transformer(model_cfg), NCEEnergy(model_cfg, mask_id=self.mask_id))

    def load_parts(self, load, tokenizer) -> None:
        """Load the energy that `energy` names from another run (ar:DIR, nce:DIR)."""
        kind, path = self.cfg.energy_kind, self.cfg.energy_path
        self.for_inference = True
        if not path:
            return
        other = load(path)
        if other.tokenizer.to_dict() != tokenizer.to_dict():
            raise ConfigError(f"edlm.energy={self.cfg.energy!r}: that run's tokenizer differs from the "
                              f"denoiser's; both must be trained on the same tokens")
        if kind == "ar":
            if other.run.method != "ar":
                raise ConfigError(f"edlm.energy=ar:{path} is a {other.run.method!r} run, not an AR run")
            if self.context and other.run.model.max_len < self.context:
                raise ConfigError(f"edlm.energy=ar:{path} has a context of {other.run.model.max_len} tokens, "
                                  f"shorter than the denoiser's {self.context}")
            self.energy_module = AREnergy(other.model, bos_id=self.bos_id, mask_id=self.mask_id,
                                          carry_over=self.cfg.carry_over)
        else:
            if other.run.method != "edlm" or not isinstance(other.model.energy, NCEEnergy):
                raise ConfigError(f"edlm.energy=nce:{path} is not an EDLM run with an NCE energy")
            self.energy_module = other.model.energy
            self.energy_denoiser = other.model.denoiser.state_dict()

    def adopt_weights(self, model: EDLMModel, weights: dict, source: str) -> dict:
        """A full state dict for `model` from a checkpoint of method `source`: an MDLM run's
        weights become the denoiser's (and the NCE backbone's starting point); an EDLM run's are
        taken as they are."""
        if source not in ("mdlm", "edlm"):
            raise ConfigError(f"EDLM starts from an MDLM run, not a {source!r} run")
        if source == "edlm" and self.energy_module is None:
            return weights
        if source == "mdlm" and self.energy_module is None and self.for_inference:
            raise ConfigError("an MDLM run has no energy: give --edlm.energy ar:AR_DIR or nce:EDLM_DIR")
        denoiser = weights if source == "mdlm" else \
            {k.removeprefix("denoiser."): v for k, v in weights.items() if k.startswith("denoiser.")}
        out = dict(model.state_dict())
        out.update({f"denoiser.{k}": v for k, v in denoiser.items()})
        if self.energy_module is None:  # a fresh NCE energy starts from the denoiser's weights
            out.update({f"energy.backbone.{k}": v for k, v in denoiser.items()
                        if f"energy.backbone.{k}" in out})
        elif self.energy_denoiser is not None and not same_weights(self.energy_denoiser, denoiser):
            raise ConfigError(f"edlm.energy={self.cfg.energy!r} was trained against another MDLM "
                              f"denoiser than this checkpoint's; sample that EDLM run itself")
        return out

    # ---- the network calls -------------------------------------------------------------------

    def log_x_theta(self, model, zt, t, *, x0=None, cache=None, at=None, dtype=torch.float32):
        """MDLM's SUBS denoiser, computed by the composite's frozen denoiser."""
        return super().log_x_theta(denoiser_of(model), zt, t, x0=x0, cache=cache, at=at, dtype=dtype)

    def energy(self, model, x0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, *,
               log_q: torch.Tensor | None = None) -> torch.Tensor:
        """E(x_0, x_t, t) (N,) float64 for rows x0, zt (N, L), t (N,); log_q (N,) the log-probability
        of x0 under the denoiser, up to a function of x_t (the AR energy needs it; default: computed
        from the denoiser)."""
        t = t.to(torch.float64).reshape(-1, 1)
        if log_q is None and isinstance(model.energy, AREnergy):
            log_q = sequence_log_prob(self.log_x_theta(model, zt, t, dtype=torch.float64), x0)
        sigma = self.schedule.total_noise(t).float() if self.time_conditioned else None
        return model.energy(x0, zt, sigma, log_q=log_q).double()

    def proposals(self, logp: torch.Tensor, k: int, generator: Generators = None,
                  active: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k, L): k independent draws x_0 ~ exp(logp) per row (row b's from its own generator
        when given one per row)."""
        return torch.stack([gumbel_argmax(logp, generator, active=active) for _ in range(k)], dim=1)

    def proposal_log_weights(self, model, props: torch.Tensor, zt: torch.Tensor, t: torch.Tensor,
                             logp: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """(B, k) float64 log importance weights -E / tau of proposals props (B, k, L) drawn from
        logp (B, L, V) given zt (B, L) at times t (B,). logp is the denoiser at temperature tau,
        cut by top-k / top-p to the kept set S: on S, log p_theta = tau * logp + a function of zt,
        which is the AR energy's log p_theta here; so q exp(-E / tau) is proportional to
        p_phi^(1/tau) on S (module docstring). Row b's proposals are rows b*k .. b*k+k-1 of one
        batched pass (repeat_interleave, then view(B, k)), so no row reads another's."""
        B, k, L = props.shape
        flat = props.reshape(B * k, L)
        log_q = logp.unsqueeze(1).expand(B, k, *logp.shape[1:]).gather(-1, props[..., None])  # a view, no copy
        log_p_theta = temperature * log_q.double().squeeze(-1).sum(-1).reshape(B * k)
        energies = self.energy(model, flat, zt.repeat_interleave(k, dim=0), t.repeat_interleave(k, dim=0),
                               log_q=log_p_theta)
        return -energies.view(B, k) / temperature

    # ---- training: noise-contrastive estimation ----------------------------------------------

    def loss(self, model, x0, *, t=None, loss_mask=None, generator=None) -> LossOutput:
        """NCE loss per sequence (see the module docstring) spread evenly over its L positions, so
        that `loss` is the batch mean divided by L. t injectable, (B,)."""
        B, L = x0.shape
        t = self.training_times(B, L, generator=generator, device=x0.device) if t is None \
            else self.snap_t(t.to(x0.device))
        t = t.reshape(B)
        zt = self.corrupt(x0, t[:, None], generator)
        n = self.cfg.negatives
        with torch.no_grad():
            logp = self.log_x_theta(model, zt, t[:, None], dtype=torch.float32)
            negatives = self.proposals(logp, n, generator).reshape(B * n, L)
        e_pos = self.energy(model, x0, zt, t)
        e_neg = self.energy(model, negatives, zt.repeat_interleave(n, 0), t.repeat_interleave(n, 0)).view(B, n)
        offset = math.log(n)
        per_seq = F.softplus(e_pos + offset) + F.softplus(-e_neg - offset).sum(1)  # (B,)
        weights = torch.ones((B, L), dtype=torch.float32, device=x0.device)
        token_nll = (per_seq.float()[:, None] / L).expand(B, L)
        metrics = {"nce_loss": float(per_seq.detach().mean()),
                   "nce_accuracy": float((e_pos.detach()[:, None] < e_neg.detach()).double().mean())}
        return LossOutput(loss=token_nll.sum() / weights.sum(), token_nll=token_nll, weights=weights,
                          metrics=metrics)

    # ---- likelihood --------------------------------------------------------------------------

    @torch.no_grad()
    def nll_bound(self, model, x0, *, n_samples=1, loss_mask=None, given=None, generator=None) -> NLLBound:
        """B_k per sequence in nats (float64), averaged over n_samples draws of (t, x_t); see the
        module docstring. `given` positions stay unmasked in x_t (the sampler's prompt) and are
        not counted: the bound of the sampler run with that context."""
        B, L = x0.shape
        weights = counted_weights(x0, loss_mask, given)
        total = torch.zeros(B, dtype=torch.float64, device=x0.device)
        for t in self.eval_times(B, L, n_samples, generator=generator, device=x0.device):
            t = t.reshape(B)
            zt = keep_given(x0, self.corrupt(x0, t[:, None], generator), given)
            logp = self.log_x_theta(model, zt, t[:, None], dtype=torch.float64)
            nll = -logp.gather(-1, x0[..., None]).squeeze(-1)  # (B, L), 0 where unmasked
            masked = zt == self.mask_id
            counted = masked & (weights > 0)
            base = torch.where(masked, nll, torch.zeros_like(nll))
            in_window = t >= 1.0 - self.cfg.window
            term = (base * weights).sum(1) + torch.where(
                in_window, self.sir_correction(model, x0, counted, zt, t, logp, generator), torch.zeros_like(t))
            total += self.loss_weight(t) * term
        prior = (self.prior_nll(x0) * weights).sum(1)
        return NLLBound(nll=total / n_samples + prior, tokens=weights.sum(1), exact=False)

    def sir_correction(self, model, x0, masked, zt, t, logp, generator) -> torch.Tensor:
        """(B,) float64: |M| * -log rho_k(l, x_t) for one position l per row drawn uniformly from
        `masked` (B, L), the masked positions that are counted (0 for a row without one, and for
        k = 1)."""
        B, L = x0.shape
        k, draws = self.cfg.k, self.cfg.bound_draws
        count = masked.sum(1)
        if k == 1 or not masked.any():
            return torch.zeros(B, dtype=torch.float64, device=x0.device)
        score = torch.rand(masked.shape, generator=generator, device=x0.device).masked_fill(~masked, -1.0)
        pos = score.argmax(1)  # (B,) a uniform masked position per row
        rows = torch.arange(B, device=x0.device)
        log_ratio = []
        for _ in range(draws):
            props = self.proposals(logp, k, generator)  # (B, k, L)
            props[rows, 0, pos] = x0[rows, pos]  # x^1: the data's token at l, the rest drawn
            log_w = self.proposal_log_weights(model, props, zt, t, logp)  # (B, k)
            log_ratio.append(math.log(k) + log_w[:, 0] - torch.logsumexp(log_w, dim=1))
        log_rho = torch.logsumexp(torch.stack(log_ratio), dim=0) - math.log(draws)
        return torch.where(count > 0, -count.double() * log_rho, torch.zeros_like(log_rho))

    # ---- sampling ----------------------------------------------------------------------------

    def sampler(self, cfg):
        """importance (default) | ancestral (plain MDLM with the same denoiser)."""
        from ddlm.sampling.ancestral import AncestralSampler
        from ddlm.sampling.importance import ImportanceSampler

        common = dict(steps=cfg.steps, use_cache=cfg.cache, t_min=cfg.t_min, noise_removal=cfg.noise_removal,
                      temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stride=cfg.stride)
        if self.sampler_name(cfg) == "ancestral":
            return AncestralSampler(self, **common)
        return ImportanceSampler(self, k=self.cfg.k, window=self.cfg.window, **common)


def denoiser_of(model):
    """The denoiser of an EDLM composite (or the model itself, for a bare MDLM backbone)."""
    return getattr(model, "denoiser", model)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def sequence_log_prob(logp: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(N,) float64: sum_l logp[l, x0_l] (SUBS: unmasked positions contribute log 1 = 0)."""
    return logp.double().gather(-1, x0[..., None]).squeeze(-1).sum(1)
