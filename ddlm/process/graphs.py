"""Forward CTMC graphs of score-entropy diffusion (SEDD, Lou et al. 2024), one class each.

Each position evolves independently under the rate matrix sigma(t) Q, so
    p_{t|0}(. | x0) = exp(sigma_bar(t) Q) e_{x0}        (SEDD §3, Q(y, x) = rate from x to y).
A graph gives, for token tensors of any shape (...,) and total noise sigma_bar broadcastable to it:
    transition(x0, sb)  (..., V)  p_{t|0}(y | x0)                      (float64 unless dtype= says)
    rate_into(xt)       (..., V)  Q(xt, y): the rate from y into xt, per unit sigma (0 at y = xt);
                                  the weight of the score-entropy term of neighbour y (SEDD eq. 9)
    corrupt(x0, sb, g)  (...)     x_t ~ p_{t|0}(. | x0)
    prior_kl(x0, sb)    (...)     KL(p_{1|0}(. | x0) || p_base) of the bound's prior term
    exp_apply(v, a)     (..., V)  exp(a Q) v along the last axis; a (...) may be negative
    exp_into(xt, a)     (..., V)  exp(a Q)(x_t, y): the chance of reaching x_t from y; a (...)
    sample_base(shape)  (...)     a draw of the base distribution
Ids outside `states` (e.g. BOS/PAD in a shared vocabulary) get probability 0 everywhere.
"""
from __future__ import annotations

import math

import torch

from ddlm.errors import ConfigError

class Graph:
    """Base: `vocab_size` ids, of which `states` take part in the process."""

    name = ""

    def __init__(self, vocab_size: int, states: list[int]) -> None:
        self.vocab_size = vocab_size
        self.states = torch.tensor(sorted(states), dtype=torch.long)
        self.n_states = len(states)
        member = torch.zeros(vocab_size, dtype=torch.bool)
        member[self.states] = True
        self.member = member

    def _one_hot(self, x: torch.Tensor, dtype) -> torch.Tensor:
        return torch.nn.functional.one_hot(x, self.vocab_size).to(dtype)

    def transition(self, x0: torch.Tensor, sigma_bar: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        raise NotImplementedError

    def rate_into(self, xt: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        raise NotImplementedError

    def prior_kl(self, x0: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exp_apply(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exp_into(self, xt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_base(self, shape, generator=None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def corrupt(self, x0: torch.Tensor, sigma_bar: torch.Tensor, generator=None) -> torch.Tensor:
        """x_t ~ p_{t|0}(. | x0) (...): an exact categorical draw per position."""
        p = self.transition(x0, sigma_bar.to(torch.float64))
        flat = p.reshape(-1, self.vocab_size)
        return torch.multinomial(flat, 1, generator=generator).reshape(x0.shape)


class Absorbing(Graph):
    """Every token jumps to MASK at rate 1: Q = e_m 1^T - I on the tokens (SEDD's absorb graph).

    p_{t|0}(x0 | x0) = e^{-sigma_bar}, p_{t|0}(m | x0) = 1 - e^{-sigma_bar}. Only a masked x_t has
    incoming rates: Q(m, y) = 1 for every token y. The base is all-MASK up to the mass alpha_1 =
    e^{-sigma_bar(1)} the process leaves unmasked; the bound uses p_base = (1 - alpha_1) MASK +
    alpha_1 Uniform(tokens), whose KL from p_{1|0} is alpha_1 log(n_tokens) (finite for any schedule).
    Samplers start from all-MASK (`sample_base`), the alpha_1 -> 0 limit of that base.
    """

    name = "absorbing"

    def __init__(self, vocab_size: int, mask_id: int, exclude: tuple[int, ...] = ()) -> None:
        tokens = [i for i in range(vocab_size) if i != mask_id and i not in exclude]
        super().__init__(vocab_size, tokens + [mask_id])
        self.mask_id = mask_id
        self.n_tokens = len(tokens)
        self.tokens = self.member.clone()
        self.tokens[mask_id] = False

    def transition(self, x0, sigma_bar, dtype=torch.float64):
        sb = sigma_bar.to(dtype)[..., None]
        p = self._one_hot(x0, dtype) * torch.exp(-sb)
        p[..., self.mask_id] = -torch.expm1(-sb[..., 0])
        return p

    def rate_into(self, xt, dtype=torch.float64):
        return ((xt == self.mask_id)[..., None] & self.tokens.to(xt.device)).to(dtype)

    def prior_kl(self, x0, sigma_bar):
        alpha1 = torch.exp(-sigma_bar.to(torch.float64))
        return (alpha1 * math.log(self.n_tokens)).expand(x0.shape)

    def exp_apply(self, v, a):
        # column z of exp(aQ): e^{-a} at z and 1 - e^{-a} at MASK for a token z; MASK stays MASK
        a = a.to(v.dtype)[..., None]
        tokens = self.tokens.to(v.device)
        out = torch.where(tokens, v * torch.exp(-a), torch.zeros_like(v))
        out[..., self.mask_id] = v[..., self.mask_id] - torch.expm1(-a[..., 0]) * (v * tokens).sum(-1)
        return out

    def exp_into(self, xt, a):
        a = a.to(torch.float64)[..., None]
        into_mask = -torch.expm1(-a) * self.tokens.to(xt.device) \
            + self._one_hot(torch.full_like(xt, self.mask_id), torch.float64)
        stay = self._one_hot(xt, torch.float64) * torch.exp(-a)
        return torch.where((xt == self.mask_id)[..., None], into_mask, stay)

    def sample_base(self, shape, generator=None, device=None):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)


class Uniform(Graph):
    """Every state jumps to a uniformly chosen state at rate 1: Q = 1 1^T / N - I (SEDD's uniform).

    p_{t|0}(y | x0) = e^{-sigma_bar} [y = x0] + (1 - e^{-sigma_bar}) / N over the N states, and every
    y != x_t flows into x_t at rate 1/N. Base: Uniform over the N states.
    """

    name = "uniform"

    def __init__(self, vocab_size: int, exclude: tuple[int, ...] = ()) -> None:
        super().__init__(vocab_size, [i for i in range(vocab_size) if i not in exclude])

    def transition(self, x0, sigma_bar, dtype=torch.float64):
        sb = sigma_bar.to(dtype)[..., None]
        spread = -torch.expm1(-sb) / self.n_states * self.member.to(x0.device, dtype)
        return self._one_hot(x0, dtype) * torch.exp(-sb) + spread

    def rate_into(self, xt, dtype=torch.float64):
        rate = self.member.to(xt.device, dtype).expand(*xt.shape, self.vocab_size) / self.n_states
        return rate * (1 - self._one_hot(xt, dtype))

    def prior_kl(self, x0, sigma_bar):
        p = self.transition(x0, sigma_bar)
        n = self.n_states
        terms = torch.where(p > 0, p * (torch.log(p) + math.log(n)), torch.zeros_like(p))
        return terms.sum(-1)

    def exp_apply(self, v, a):
        a = a.to(v.dtype)[..., None]
        member = self.member.to(v.device).to(v.dtype)
        spread = -torch.expm1(-a) * (v * member).sum(-1, keepdim=True) / self.n_states
        return (v * torch.exp(-a) + spread) * member

    def exp_into(self, xt, a):
        a = a.to(torch.float64)[..., None]
        member = self.member.to(xt.device).to(torch.float64)
        return self._one_hot(xt, torch.float64) * torch.exp(-a) - torch.expm1(-a) * member / self.n_states

    def sample_base(self, shape, generator=None, device=None):
        pick = torch.randint(0, self.n_states, shape, generator=generator, device=device)
        return self.states.to(pick.device)[pick]


GRAPHS = ("absorbing", "uniform")


def build_graph(name: str, vocab_size: int, mask_id: int, exclude: tuple[int, ...] = ()) -> Graph:
    """The graph by name; `exclude` lists ids that never occur (e.g. BOS, PAD)."""
    if name == "absorbing":
        return Absorbing(vocab_size, mask_id, exclude)
    if name == "uniform":
        return Uniform(vocab_size, exclude=tuple(exclude) + (mask_id,))
    raise ConfigError(f"unknown graph {name!r}; choose one of: {', '.join(GRAPHS)}")
