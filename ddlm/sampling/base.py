"""The sampler protocol, what every sampler returns, and the categorical draws they share.

    sampler = method.sampler(sample_cfg)      options are chosen at sample time
    sampler.generate(model, n, length, *, prompt=None, template=None, generator=None) -> Generation

`prompt` (1 or n, Lp) is continued by `length` new tokens; `template` (1 or n, L) fixes every
position that is not MASK and fills the rest (infilling). Given positions are never changed. Past
the method's context, windows slide (`slide_windows`). A sampler that cannot honour an argument
refuses it with a one-line ConfigError. Samplers reach the network only through the method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ddlm.errors import ConfigError
from ddlm.sampling.trace import Recorder


@dataclass
class Generation:
    """tokens: (B, L) int64; nfe: network evaluations used; seconds: wall time of the draw;
    lengths: (B,) int64 tokens per row when rows stop early (variable length; the rest is PAD),
    None when every row has all L tokens."""

    tokens: torch.Tensor
    nfe: int
    seconds: float
    lengths: torch.Tensor | None = None


class Sampler:
    """Base of every sampler. A subclass defines `fill(model, z, generator) -> (tokens, nfe)`,
    which replaces every MASK of z (n, L) and keeps every other token; `generate` handles prompts,
    templates and windows past the context around it."""

    takes_template: ClassVar[bool] = True
    recorder: Recorder | None = None  # set to watch the draw step by step (sampling/trace.py)

    def __init__(self, method, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stride: int = 0) -> None:
        self.method = method
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stride = stride  # tokens added per window past the context (0: context // 2)

    @property
    def context(self) -> int:
        """The model's context length, from the method (0: unknown, no windows)."""
        return self.method.context

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt: torch.Tensor | None = None,
                 template: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> Generation:
        """(n, Lp + length) tokens, or (n, L) for a template (then `length` is not used)."""
        self.check_request(prompt, template)
        begin = time.perf_counter()
        device = model_device(model)
        if template is not None:
            z = expand_rows(template.to(device), n, "template")
        else:
            start = prompt_rows(prompt, n, device)
            z = self.masked_after(start, length)
        if self.recorder is not None:
            self.recorder.start(z)
        if template is None and self.context and z.shape[1] > self.context:
            gen = self.generate_long(model, start, length, generator)
        else:
            tokens, nfe = self.fill(model, z, generator)
            gen = Generation(tokens, nfe, time.perf_counter() - begin)
        if self.recorder is not None:
            self.recorder.finish(gen.tokens, gen.nfe)
        return gen

    def check_request(self, prompt, template) -> None:
        if prompt is not None and template is not None:
            raise ConfigError("give a prompt or a template, not both")
        if template is not None and not self.takes_template:
            raise ConfigError(f"the {type(self).__name__} of method {self.method.name!r} cannot fill "
                              f"a template (infilling); give a prompt instead")

    def masked_after(self, start: torch.Tensor, length: int) -> torch.Tensor:
        """start (n, Lp) followed by `length` MASK tokens."""
        masks = torch.full((start.shape[0], length), self.method.mask_id, dtype=torch.long,
                           device=start.device)
        return torch.cat([start, masks], dim=1)

    def generate_long(self, model, start: torch.Tensor, length: int, generator, *,
                      context: int | None = None, stride: int | None = None) -> Generation:
        """Past the context: windows of `context` tokens, each keeping the last context - stride as
        a clean prefix (see slide_windows)."""
        context = context or self.context
        done = {"tokens": start.shape[1], "nfe": 0}  # written so far, for the recorder's window

        def window(prefix, new):
            first = start[:, :0] if prefix is None else prefix
            if self.recorder is not None:
                self.recorder.window(done["tokens"] - first.shape[1], nfe_before=done["nfe"])
            tokens, used = self.fill(model, self.masked_after(first, new), generator)
            done["tokens"] += new
            done["nfe"] += used
            return tokens[:, tokens.shape[1] - new:], used

        return slide_windows(window, start, length, context,
                             stride or self.stride or max(1, context // 2))

    def fill(self, model, z: torch.Tensor, generator) -> tuple[torch.Tensor, int]:
        """Replace every MASK of z (n, L); returns (tokens, network evaluations)."""
        raise NotImplementedError


class SemiAutoregressiveSampler:
    """Wraps a sampler so `generate` always slides a window of `context` by `stride`."""

    def __init__(self, inner: Sampler, *, context: int | None = None, stride: int | None = None) -> None:
        self.inner, self.context, self.stride = inner, context, stride

    @property
    def recorder(self) -> Recorder | None:
        return self.inner.recorder

    @recorder.setter
    def recorder(self, recorder: Recorder | None) -> None:
        self.inner.recorder = recorder

    @torch.no_grad()
    def generate(self, model, n: int, length: int, *, prompt=None, template=None,
                 generator=None) -> Generation:
        if template is not None:
            return self.inner.generate(model, n, length, template=template, generator=generator)
        device = model_device(model)
        start = prompt_rows(prompt, n, device)
        if self.recorder is not None:
            self.recorder.start(self.inner.masked_after(start, length))
        gen = self.inner.generate_long(model, start, length, generator, context=self.context,
                                       stride=self.stride)
        if self.recorder is not None:
            self.recorder.finish(gen.tokens, gen.nfe)
        return gen


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a parameterless callable, as in tests)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def prompt_rows(prompt: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """(n, Lp) int64 prompt rows on `device`; (n, 0) without a prompt."""
    if prompt is None:
        return torch.empty((n, 0), dtype=torch.long, device=device)
    return expand_rows(prompt.to(device), n, "prompt")


def expand_rows(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """(1 or n, K) or (K,) -> (n, K) int64: a prompt or template given once or per sample."""
    x = x.long().reshape(-1, x.shape[-1])
    if x.shape[0] not in (1, n):
        raise ValueError(f"{what} has {x.shape[0]} rows; expected 1 or n={n}")
    return x.expand(n, -1).clone()


def slide_windows(window: Callable[[torch.Tensor | None, int], tuple[torch.Tensor, int]],
                  start: torch.Tensor, length: int, context: int, stride: int) -> Generation:
    """Semi-autoregressive generation past the context (MDLM §4.3-style sliding window).

    From the prompt rows `start` (n, Lp), repeatedly keep the last (context - stride) tokens as a
    clean prefix (None when there is none yet) and call window(prefix, new) for the next `new`
    tokens, (n, new), and its NFE. Returns (n, Lp + length) tokens; nfe sums every window's.
    """
    begin = time.perf_counter()
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in 1..context={context}")
    keep = context - stride
    out, goal, nfe = start, start.shape[1] + length, 0
    while out.shape[1] < goal:
        prefix = out[:, max(0, out.shape[1] - keep):] if out.shape[1] else None
        new = min(goal - out.shape[1], context - (0 if prefix is None else prefix.shape[1]))
        tokens, used = window(prefix, new)
        out, nfe = torch.cat([out, tokens], dim=1), nfe + used
    return Generation(tokens=out, nfe=nfe, seconds=time.perf_counter() - begin)


Generators = torch.Generator | list[torch.Generator] | None


def uniform(shape: tuple[int, ...], generator: Generators, device, *,
            active: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) float64 of `shape` (rows first). `generator` is one generator for the batch or a
    list with one per row; with a list, row b draws only from its own generator and only when
    `active[b]` (inactive rows get 0.5 and consume nothing), so a row's draws do not depend on
    which other rows share its batch."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    out = torch.full(shape, 0.5, dtype=torch.float64, device=device)
    for b, g in enumerate(generator):
        if active is None or bool(active[b]):
            out[b] = torch.rand(shape[1:], dtype=torch.float64, generator=g, device=device)
    return out


def gumbel_argmax(logp: torch.Tensor, generator: Generators = None, *,
                  active: torch.Tensor | None = None) -> torch.Tensor:
    """Draw from Cat(softmax(logp)) over the last axis with Gumbel noise in float64; `generator`
    and `active` as in `uniform`.

    float32 Gumbel noise truncates the tail (docs/methods.md §7) and flatters generative perplexity.
    """
    logp = logp.double()
    u = uniform(logp.shape, generator, logp.device, active=active)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logp + gumbel).argmax(dim=-1)


def row_generators(seeds: list[int], device=None) -> list[torch.Generator]:
    """One generator per row, seeded from `seeds` (per-row reproducible sampling)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; returns log-probs (float64)."""
    logits = logits.double() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        cum = sorted_logp.exp().cumsum(dim=-1)
        drop_sorted = (cum - sorted_logp.exp()) >= top_p  # keep the smallest set with mass >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp
