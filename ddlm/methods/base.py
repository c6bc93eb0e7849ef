"""The Method protocol: one file of math per method, registered by name.

A method owns the corruption process, the parameterisation of the backbone's logits, the loss
weighting, the likelihood bound, the model it trains and its samplers. Shared code (trainer,
evaluator, CLI, samplers) only ever talks to this interface:

    build_model(model_cfg) -> nn.Module        the one Transformer by default; a method may return a
                                               composite whose frozen parts (requires_grad=False)
                                               the trainer leaves out of the optimizer and EMA
    adopt_weights(model, weights, source)      map another run's weights onto that model (--init)
    loss(model, x0, *, t=None, loss_mask=None) -> LossOutput
    nll_bound(model, x0, *, n_samples, loss_mask, given, generator) -> NLLBound   (if has_likelihood)
                                               given (B, L) bool: a clean context, never corrupted
                                               and not counted (the bound is then on the other
                                               positions given it: lm-eval's loglikelihood)
    sampler(sample_cfg) -> Sampler             options chosen at sample time
    adapt(model, batches) -> dict              optional: state tuned on held-out batches every
                                               `adapt_every` steps (state_dict / load_state_dict)
and one network call that the loss, the bound and every sampler go through (MDLM: log_x_theta,
SEDD: log_score, AR: logits). Times are per position: (B,), (B, K) with K dividing L, or (B, L).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ddlm.errors import ConfigError
from ddlm.nn.transformer import Transformer


@dataclass
class LossOutput:
    """loss: scalar to back-propagate (mean over counted tokens).
    token_nll: (B, L) per-token loss contribution in nats (float32), zero where not counted.
    weights: (B, L) float mask of the tokens that count (1 = counted).
    metrics: other figures a method reports with its loss (validation averages and logs them)."""

    loss: torch.Tensor
    token_nll: torch.Tensor
    weights: torch.Tensor
    metrics: dict | None = None


@dataclass
class NLLBound:
    """Per-sequence upper bound on -log p(x) in nats (float64) and the tokens it covers.

    nll: (B,) float64 — the bound summed over the sequence's counted tokens.
    tokens: (B,) float64 — the number of counted tokens per sequence.
    exact: True when the number is the exact NLL (AR), False for a variational bound.
    """

    nll: torch.Tensor
    tokens: torch.Tensor
    exact: bool = False


@dataclass
class MethodConfig:
    """Base class of every method's options (`--<method>.<field>=value`)."""

    def validate(self) -> None:
        """Raise ConfigError on values out of range; subclasses extend."""


class Method:
    """Base class. Subclasses set `name`, `config_class`, `attention`, `time_conditioned`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    attention: ClassVar[str] = "bidirectional"  # mask kind the backbone uses for training
    bound_name: ClassVar[str] = "exact NLL"  # what nll_bound computes, for reports
    has_likelihood: ClassVar[bool] = True  # False: nll_bound is not defined (eval refuses)
    default_block: ClassVar[str] = "plain"  # backbone block when model.block is auto
    samplers: ClassVar[tuple[str, ...]] = ()  # sampler names; the first is the default
    has_steps: ClassVar[bool] = True  # False: sampling takes no step count (AR: one token per call)
    validation: ClassVar[str] = "likelihood"  # what training validates: likelihood | loss
    wraps: ClassVar[tuple[str, ...]] = ()  # methods whose checkpoints this one can be built around
    # Where the papers place this method's likelihood among the others (`likelihood_rank`, lower:
    # better; None: no claim), and the tables that place it below the methods ranked after it:
    # `ddlm compare` tests each neighbouring pair.
    likelihood_source: ClassVar[str] = ""
    sample_options: ClassVar[tuple[str, ...]] = ()  # method options that may change at sample/eval time
    needs_init: ClassVar[str] = ""  # non-empty: training must start from a run (--init); says which

    def __init__(self, cfg: MethodConfig, *, vocab_size: int, mask_id: int, bos_id: int,
                 pad_id: int, context: int = 0) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.context = context  # the model's context length (0: unknown, no sliding window)

    never_emitted: tuple[int, ...] = ()  # ids the model never outputs (model.output_vocab on)

    def set_never_emitted(self, ids) -> None:
        """Ids the network never emits (an imported vocabulary's appended mask/pad): a method whose
        process or prior counts the vocabulary leaves them out."""
        self.never_emitted = tuple(int(i) for i in ids)

    def build_model(self, model_cfg: Any) -> torch.nn.Module:
        """The network this method trains (default: the one Transformer)."""
        return Transformer(model_cfg)

    @property
    def time_conditioned(self) -> bool:
        """Whether the backbone receives a noise level `sigma` (adaLN)."""
        return False

    def loss(self, model: Callable, x0: torch.Tensor, *, t: torch.Tensor | None = None,
             loss_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    def nll_bound(self, model: Callable, x0: torch.Tensor, *, n_samples: int = 1,
                  loss_mask: torch.Tensor | None = None, given: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> NLLBound:
        """Upper bound on -log p(x0 at the counted positions | x0 at the `given` positions): the
        given positions (B, L) bool are clean at every t and not counted; None: no context."""
        raise NotImplementedError

    def sampler(self, cfg: Any):
        """The sampler a SampleConfig names (cfg.sampler '' : the method's default)."""
        raise NotImplementedError

    def adopt_weights(self, model: torch.nn.Module, weights: dict, source: str) -> dict:
        """The state dict to load into `model` from a checkpoint of method `source` (`--init`, or
        a composite built around another run); default: the weights as they are."""
        return weights

    def load_parts(self, load: Callable, tokenizer) -> None:
        """Load the parts of the model that other runs supply (EDLM's AR or NCE energy) with
        `load(path) -> Loaded`; they must share `tokenizer`. Default: none."""

    # ---- state a method adapts while training (e.g. BD3-LM's clipped window) -----------------

    adapt_every: int = 0  # the trainer calls `adapt` every this many steps (0: never)
    adapt_batches: int = 0  # held-out batches it passes

    def adapt(self, model, batches: list[torch.Tensor], generator=None) -> dict:
        """Update the method's own state from held-out batches; returns a record to log."""
        return {}

    def state_dict(self) -> dict:
        """The adapted state (floats and lists only), saved with the trainer state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output."""

    def describe_adapted(self, records: list[dict]) -> dict[str, str]:
        """What `ddlm info` shows of the adapted state, from the run's logged records (inference
        never reads the trainer state that holds it)."""
        return {}

    @classmethod
    def variant(cls, options: dict) -> str:
        """The name the report's claims use for this method with `options` (its config section)."""
        return cls.name

    @classmethod
    def likelihood_rank(cls, options: dict) -> float | None:
        """This method's place in the papers' likelihood ordering (lower: better), or None."""
        return None

    def sampler_name(self, cfg: Any) -> str:
        """cfg.sampler, or the default; an unknown name is a one-line ConfigError."""
        if not self.samplers:
            raise ConfigError(f"method {self.name!r} has no sampler")
        name = cfg.sampler or self.samplers[0]
        if name not in self.samplers:
            raise ConfigError(f"unknown {self.name} sampler {name!r}; choose one of: {', '.join(self.samplers)}")
        return name


def counted_weights(x0: torch.Tensor, loss_mask: torch.Tensor | None,
                    given: torch.Tensor | None) -> torch.Tensor:
    """(B, L) float64 weights of a bound's counted tokens: loss_mask (default every token), and
    never a `given` (context) position."""
    weights = torch.ones(x0.shape, dtype=torch.float64, device=x0.device) if loss_mask is None \
        else loss_mask.to(torch.float64)
    if given is None:
        return weights
    if given.shape != x0.shape or given.dtype != torch.bool:
        raise ConfigError(f"given must be a bool tensor of the tokens' shape {tuple(x0.shape)}; "
                          f"got {given.dtype} {tuple(given.shape)}")
    return weights.masked_fill(given, 0.0)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """Look a method up by name; an unknown name is a one-line ConfigError."""
    import ddlm.methods  # noqa: F401  (registers the built-in methods)

    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown method {name!r}; choose one of: {known}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    import ddlm.methods  # noqa: F401

    return sorted(_REGISTRY)
