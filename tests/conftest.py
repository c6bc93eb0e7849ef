"""Exact fixtures shared by the test files: an enumerable tiny joint and models that know it.

Everything here is computed from the joint table and the forward process as specified (docs/
methods.md), independently of the code under test:

  JOINT over SEQS          a Dirichlet draw over all V^L sequences (V = 3 symbols, L = 3), float64
  conditional(...)         p(x_i | x_visible) by summing the table
  ExactDenoiser            MDLM's ideal SUBS target: logits = log p(x_l | unmasked positions of z)
  ExactScores              SEDD's exact concrete scores p_t(z with z_l = y) / p_t(z), absorbing or
                           uniform graph, from the matrix exponential of the graph's rate matrix
  ExactAR                  logits = log p(x_{i+1} | x_1..x_i) for the BOS-shifted input (with an
                           optional cache, so ARSampler can draw from it)
  ExactMaskedAttention     BD3-LM: logits = log p(x_pos | non-MASK tokens of the keys the attention
                           mask lets the query see), with a cache of tokens and positions
  ExactEnergy              EDLM's exact energy E* = -log p(x_0) + log q(x_0 | z), q the proposal:
                           q exp(-E*) is the joint restricted to the completions of z (the
                           posterior), so the residual EBM over the exact denoiser is exact
  ExactEDLM                EDLM's composite: `.denoiser` (ExactDenoiser) and `.energy`
  EXACT_MODELS             method name -> callable(method) -> its exact model on JOINT; a new
                           method joins tests/test_contract.py's bound check by adding an entry

Import them as plain helpers (`from conftest import JOINT, ExactDenoiser`): tests/ has no
__init__.py, so pytest's default (prepend) import mode puts tests/ on sys.path and this module is
importable by name.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

V, L, MASK = 3, 3, 3  # data symbols 0..V-1, MASK = V; the tiny vocabulary has V + 1 ids


def all_sequences(n_symbols: int, length: int) -> torch.Tensor:
    """(n_symbols^length, length) every sequence, in lexicographic order."""
    return torch.tensor(list(itertools.product(range(n_symbols), repeat=length)), dtype=torch.long
                        ).reshape(-1, length)


def dirichlet_joint(n_cells: int, seed: int = 0, concentration: float = 0.3) -> torch.Tensor:
    """(n_cells,) float64: a random, strongly correlated law (a symmetric Dirichlet draw)."""
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((n_cells,), concentration, dtype=torch.float64), generator=g)
    return x / x.sum()


SEQS = all_sequences(V, L)  # (27, L)
PLACE = torch.tensor([V ** (L - 1 - i) for i in range(L)])  # sequence -> index into SEQS


def make_joint(seed: int = 0, concentration: float = 0.3) -> torch.Tensor:
    """A random joint over the V^L sequences of SEQS (Dirichlet draw), float64."""
    return dirichlet_joint(V ** L, seed, concentration)


JOINT = make_joint()


def gauss_legendre(a: float, b: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights (float64) of n-point Gauss-Legendre quadrature on [a, b]."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    t = (b - a) / 2 * torch.from_numpy(nodes) + (a + b) / 2
    return t, (b - a) / 2 * torch.from_numpy(weights)


# ------------------------------------------------------------------------- exact conditionals

def conditional(joint: torch.Tensor, x: tuple, visible: tuple, i: int, *, n_symbols: int = V) -> float:
    """p(x_i | x_visible) by summing the joint table over the other positions."""
    length = round(math.log(joint.numel(), n_symbols))
    table = joint.view((n_symbols,) * length).numpy()
    keep = [slice(None)] * length
    for j in visible:
        keep[j] = x[j]
    given = table[tuple(keep)].sum()
    keep[i] = x[i]
    return float(table[tuple(keep)].sum() / given)


def patterns(length: int = L) -> list[torch.Tensor]:
    """All 2^length mask patterns as (length,) bool tensors."""
    return [torch.tensor(bits, dtype=torch.bool) for bits in itertools.product([False, True], repeat=length)]


def pattern_cost(joint, x: tuple, masked: torch.Tensor) -> float:
    """sum over masked i of -log p(x_i | x_unmasked)."""
    length = len(x)
    visible = tuple(j for j in range(length) if not masked[j])
    return sum(-math.log(conditional(joint, x, visible, i)) for i in range(length) if masked[i])


# ------------------------------------------------------------------------------- MDLM: denoiser

class ExactDenoiser:
    """A `model` whose logits are log p(x_l | unmasked positions of z) (the exact SUBS target).

    The MASK logit is an arbitrary large number (SUBS must zero it), ids that are neither data
    symbols nor MASK get -inf, and unmasked positions get the same conditional as masked ones would
    (SUBS must carry the token over). `calls` counts the calls."""

    def __init__(self, joint: torch.Tensor = JOINT, *, n_symbols: int = V, length: int = L,
                 mask_id: int = MASK, vocab: int | None = None, mask_logit: float = 9.0) -> None:
        self.joint, self.calls = joint, 0
        self.seqs = all_sequences(n_symbols, length)
        self.mask_id, self.mask_logit = mask_id, mask_logit
        self.vocab = vocab if vocab is not None else max(n_symbols, mask_id) + 1
        self.onehot = F.one_hot(self.seqs, self.vocab).double()  # (S, L, vocab)

    def __call__(self, z, *, sigma=None, mask=None, **_):
        self.calls += 1
        seqs = self.seqs.to(z.device)
        compatible = ((z[:, None, :] == self.mask_id) | (z[:, None, :] == seqs[None])).all(-1)  # (B, S)
        post = compatible * self.joint.to(z.device)
        post = post / post.sum(1, keepdim=True)
        logits = torch.einsum("bs,slv->blv", post, self.onehot.to(z.device)).log()  # (B, L, vocab)
        logits[..., self.mask_id] = self.mask_logit
        return logits


# -------------------------------------------------------------------------------- SEDD: scores

def rate_matrix(graph: str, vocab: int = V + 1, mask_id: int = MASK) -> torch.Tensor:
    """Q[y, x] = rate from x to y over `vocab` ids (columns sum to 0), as specified in
    docs/methods.md §4.1: absorbing sends every non-MASK id to MASK at rate 1; uniform jumps among
    the non-MASK ids at rate 1 to a uniform one (MASK is not a state)."""
    Q = torch.zeros(vocab, vocab, dtype=torch.float64)
    states = [i for i in range(vocab) if i != mask_id]
    if graph == "absorbing":
        for x in states:
            Q[mask_id, x], Q[x, x] = 1.0, -1.0
    elif graph == "uniform":
        for x in states:
            for y in states:
                Q[y, x] = 1.0 / len(states)
            Q[x, x] -= 1.0
    else:
        raise ValueError(graph)
    return Q


def kernel(graph: str, sigma_bar: torch.Tensor, vocab: int = V + 1, mask_id: int = MASK) -> torch.Tensor:
    """(B, vocab, vocab) K[b, y, x] = p_{t|0}(y | x) = exp(sigma_bar Q)[y, x]."""
    Q = rate_matrix(graph, vocab, mask_id)
    return torch.linalg.matrix_exp(sigma_bar.double().reshape(-1)[:, None, None] * Q)


class ExactScores:
    """A `model` whose logits give SEDD's exact log concrete scores of the joint `joint` over
    `all_sequences(n_symbols, length)`: s[b, l, y] = p_t(z with z_l = y) / p_t(z) with
    p_t = K^{(x) L} joint, K = exp(sigma_bar Q). sigma_bar is read from the model's `sigma`
    argument (a time-conditioned method), or set per row in `.sigma_bar`. For the absorbing graph
    the method's output scaling (log expm1(sigma_bar) + log n_tokens) is undone."""

    def __init__(self, graph: str, n_tokens: int, *, joint: torch.Tensor = JOINT, n_symbols: int = V,
                 length: int = L, vocab: int = V + 1, mask_id: int = MASK) -> None:
        self.graph, self.n_tokens, self.sigma_bar = graph, n_tokens, None
        self.joint, self.vocab, self.mask_id = joint, vocab, mask_id
        self.seqs = all_sequences(n_symbols, length)
        self.n_symbols, self.calls = n_symbols, 0

    @classmethod
    def for_method(cls, method, *, joint: torch.Tensor = JOINT, n_symbols: int = V, length: int = L):
        n_tokens = method.graph.n_tokens if method.cfg.graph == "absorbing" else method.graph.n_states
        return cls(method.cfg.graph, n_tokens, joint=joint, n_symbols=n_symbols, length=length,
                   vocab=method.vocab_size, mask_id=method.mask_id)

    def __call__(self, z, *, sigma=None, mask=None, **_):
        self.calls += 1
        B, length = z.shape
        sigma_bar = self.sigma_bar if self.sigma_bar is not None else sigma.double().reshape(B)
        levels, row_level = torch.unique(sigma_bar, return_inverse=True)  # one matrix_exp per level
        K = kernel(self.graph, levels, self.vocab, self.mask_id)[row_level][:, :, :self.n_symbols]  # (B, vocab, n)
        rows = torch.arange(B)
        Kz = K[rows[:, None], z]  # (B, L, n): K(z_j | a)
        fac = torch.stack([Kz[:, j, self.seqs[:, j]] for j in range(length)], 1)  # (B, L, S)
        here = (self.joint[None] * fac.prod(1)).sum(1)  # (B,) p_t(z)
        out = []
        for l in range(length):
            others = self.joint[None] * torch.cat([fac[:, :l], fac[:, l + 1:]], 1).prod(1)  # (B, S)
            numer = torch.einsum("bs,bys->by", others, K[:, :, self.seqs[:, l]])  # (B, vocab)
            out.append(numer / here[:, None])
        log_s = torch.stack(out, 1).log()  # (B, L, vocab)
        if self.graph == "absorbing":
            log_s = log_s + torch.log(torch.expm1(sigma_bar))[:, None, None] + math.log(self.n_tokens)
        return log_s


# ----------------------------------------------------------------------------------- AR: logits

class ExactAR:
    """A causal `model` whose logits at position i are log p(x_{i+1} = . | x_1..x_i) of the joint,
    for the BOS-shifted input [BOS, x_1, ..]: the token at position 0 is never read (so BOS may
    share an id with a data symbol). With `new_cache` it continues a cached prefix, as ARSampler
    calls it."""

    class Cache:
        def __init__(self) -> None:
            self.tokens = None

    def __init__(self, joint: torch.Tensor = JOINT, *, n_symbols: int = V, length: int = L,
                 vocab: int = V + 1) -> None:
        self.joint, self.vocab, self.n_symbols = joint, vocab, n_symbols
        self.seqs = all_sequences(n_symbols, length)
        self.calls = 0

    def new_cache(self, batch: int, max_len: int | None = None) -> "ExactAR.Cache":
        return ExactAR.Cache()

    def __call__(self, tokens, *, sigma=None, mask=None, cache=None, **_):
        assert mask == "causal", mask
        self.calls += 1
        new = tokens.shape[1]
        if cache is not None:
            tokens = tokens if cache.tokens is None else torch.cat([cache.tokens, tokens], 1)
            cache.tokens = tokens
        B, n = tokens.shape
        logits = torch.full((B, n, self.vocab), float("-inf"), dtype=torch.float64)
        for i in range(min(n, self.seqs.shape[1])):
            prefix = tokens[:, 1:i + 1]  # x_1..x_i
            compatible = (self.seqs[None, :, :i] == prefix[:, None, :]).all(-1)  # (B, S)
            post = compatible * self.joint[None]
            nxt = torch.zeros(B, self.n_symbols, dtype=torch.float64).index_add_(
                1, self.seqs[:, i], post)  # (B, n) mass of x_{i+1} = y
            logits[:, i, :self.n_symbols] = (nxt / nxt.sum(1, keepdim=True)).log()
        return logits[:, n - new:]


# ------------------------------------------------------------------------ BD3-LM: masked attention

class ExactMaskedAttention:
    """A `model` that is exact for `joint` under whatever attention mask it is given (BD3-LM).

    Every query reads the keys its boolean mask row lets it see (a str mask: "bidirectional" or
    None sees every key, "causal" the keys at or before it; QueryGroups through their dense mask),
    among the cached keys followed by the call's tokens; the non-MASK tokens at those keys'
    positions are its known values, and its logits are log p(x_pos | known values) from the joint
    table, pos the query's position. The MASK logit
    is an arbitrary large number, ids that are neither symbols nor MASK get -inf, and sigma is not
    read (the exact SUBS target does not depend on t). Two visible keys at one position holding
    different symbols are an error. With `new_cache` it stores the tokens and positions of calls
    made with cache_write=True (as a KV cache stores keys and values); `keep_rows` drops rows.
    `calls` counts the calls."""

    class Cache:
        def __init__(self, batch: int) -> None:
            self.tokens = torch.zeros(batch, 0, dtype=torch.long)
            self.positions = torch.zeros(0, dtype=torch.long)
            self.length = 0

        def keep_rows(self, rows: torch.Tensor) -> None:
            self.tokens = self.tokens[rows]

    def __init__(self, joint: torch.Tensor = JOINT, *, n_symbols: int = V, length: int = L,
                 mask_id: int = MASK, vocab: int | None = None, mask_logit: float = 9.0) -> None:
        self.joint, self.n_symbols, self.length, self.calls = joint, n_symbols, length, 0
        self.seqs = all_sequences(n_symbols, length)  # (S, length)
        self.mask_id, self.mask_logit = mask_id, mask_logit
        self.vocab = vocab if vocab is not None else max(n_symbols, mask_id) + 1

    def new_cache(self, batch: int, max_len: int | None = None) -> "ExactMaskedAttention.Cache":
        return ExactMaskedAttention.Cache(batch)

    def parameters(self):
        return iter(())

    @staticmethod
    def visibility(mask, batch: int, n_query: int, n_key: int) -> torch.Tensor:
        """(B, Nq, Nk) bool: which keys each query reads (queries are the last Nq of Nk)."""
        if mask is None or (isinstance(mask, str) and mask == "bidirectional"):
            return torch.ones(batch, n_query, n_key, dtype=torch.bool)
        if isinstance(mask, str):
            assert mask == "causal", mask
            offset = n_key - n_query
            q = torch.arange(n_query)[:, None] + offset
            return (torch.arange(n_key)[None, :] <= q).expand(batch, -1, -1)
        if hasattr(mask, "dense"):  # ddlm.nn.attention.QueryGroups
            mask = mask.dense()
        mask = mask.bool().cpu()
        if mask.dim() == 4:  # (B or 1, 1, Nq, Nk)
            mask = mask[:, 0]
        assert mask.shape[-2:] == (n_query, n_key), (tuple(mask.shape), n_query, n_key)
        return mask.expand(batch, n_query, n_key)

    def __call__(self, tokens, *, sigma=None, mask=None, cache=None, cache_write=True, positions=None,
                 logits_for=None, **_):
        self.calls += 1
        B, N = tokens.shape
        tokens = tokens.cpu()
        offset = cache.length if cache is not None else 0
        positions = torch.arange(offset, offset + N) if positions is None else positions.cpu().long()
        keys, key_pos = tokens, positions
        if cache is not None:
            keys = torch.cat([cache.tokens, tokens], dim=1)
            key_pos = torch.cat([cache.positions, positions])
            if cache_write:
                cache.tokens, cache.positions = keys, key_pos
                cache.length += N
        assert int(key_pos.max()) < self.length and int(key_pos.min()) >= 0, key_pos
        seen = self.visibility(mask, B, N, keys.shape[1])  # (B, N, K)
        known = torch.full((B, N, self.length), self.mask_id, dtype=torch.long)
        for j in range(keys.shape[1]):
            value = keys[:, j][:, None].expand(B, N)
            here = seen[:, :, j] & (value != self.mask_id)
            old = known[:, :, key_pos[j]]
            assert not (here & (old != self.mask_id) & (old != value)).any(), "two values at one position"
            known[:, :, key_pos[j]] = torch.where(here, value, old)
        # one conditional per distinct (known values, query position): code them as integers
        base = self.n_symbols + 1
        digits = torch.where(known == self.mask_id, self.n_symbols, known)  # MASK -> n_symbols
        codes = (digits * base ** torch.arange(self.length)).sum(-1) + positions * base ** self.length
        unique, inverse = torch.unique(codes.reshape(-1), return_inverse=True)
        pos_u = unique // base ** self.length
        known_u = (unique[:, None] // base ** torch.arange(self.length)) % base  # (U, length)
        seqs = self.seqs
        compatible = ((known_u[:, None, :] == self.n_symbols) | (known_u[:, None, :] == seqs)).all(-1)
        post = compatible * self.joint  # (U, S)
        marg = torch.zeros(len(unique), self.vocab, dtype=torch.float64).scatter_add_(
            1, seqs[:, pos_u].T, post)  # (U, vocab): mass of x_pos = v
        logits = (marg / marg.sum(-1, keepdim=True)).log()[inverse].view(B, N, self.vocab)
        logits[..., self.mask_id] = self.mask_logit
        if logits_for is not None:
            logits = logits[:, :logits_for]
        return logits


# ------------------------------------------------------------------------------- EDLM: energy

class ExactEnergy:
    """EDLM's energy with which p_theta(x_0 | z) exp(-E) / Z is the exact posterior of `joint`:
    E*(x_0, z) = -scale * (log p(x_0) - log q(x_0 | z)), scale = 1 (other scales: deliberately
    imperfect energies). Any function of z alone cancels in the self-normalised weights, so
    -log p(x_0) stands for -log p(x_0 | x_0 agrees with z).

    `log_q` (N,) is the proposal's log-probability of x_0 as the method passes it (it knows the
    temperature / top-p it applied); without it, q is the exact denoiser's factorised proposal
    prod_{l masked in z} p(x_l | unmasked positions of z), computed here from the table. `calls`
    counts the calls, `seen` keeps (x_0, z) of each call when `record` is set."""

    def __init__(self, joint: torch.Tensor = JOINT, *, n_symbols: int = V, length: int = L,
                 mask_id: int = MASK, scale: float = 1.0, record: bool = False) -> None:
        self.joint, self.n_symbols, self.mask_id, self.scale = joint, n_symbols, mask_id, scale
        self.place = torch.tensor([n_symbols ** (length - 1 - i) for i in range(length)])
        self.denoiser = ExactDenoiser(joint, n_symbols=n_symbols, length=length, mask_id=mask_id)
        self.calls, self.record, self.seen = 0, record, []

    def log_q(self, x0: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """(N,) float64 log prod_{l masked in zt} p(x0_l | unmasked positions of zt)."""
        logits = self.denoiser(zt)  # (N, L, vocab): log p(x_l | unmasked of zt) at every l
        token = logits.gather(-1, x0[..., None]).squeeze(-1)
        return torch.where(zt == self.mask_id, token, torch.zeros_like(token)).sum(1)

    def __call__(self, x0, zt, sigma=None, *, log_q=None):
        self.calls += 1
        if self.record:
            self.seen.append((x0.clone(), zt.clone()))
        log_p = self.joint.to(x0.device).log()[(x0 * self.place.to(x0.device)).sum(1)]
        if log_q is None:
            log_q = self.log_q(x0, zt)
        return -self.scale * (log_p - log_q.double())


class ExactEDLM:
    """EDLM's composite model: a denoiser (called like a backbone) and an energy (called as
    energy(x0, zt, sigma, log_q=...)). Parameterless, so samplers place it on the CPU."""

    def __init__(self, denoiser, energy) -> None:
        self.denoiser, self.energy = denoiser, energy

    def parameters(self):
        return iter(())


# ------------------------------------------------------------------------------------ registry

def _exact_sedd(method):
    return ExactScores.for_method(method)


def _exact_mdlm(method):
    return ExactDenoiser(JOINT, vocab=method.vocab_size, mask_id=method.mask_id)


def _exact_ar(method):
    return ExactAR(JOINT, vocab=method.vocab_size)


def _exact_bd3(method):
    return ExactMaskedAttention(JOINT, vocab=method.vocab_size, mask_id=method.mask_id)


def _exact_edlm(method):
    """The exact MDLM denoiser with the zero energy (ExactEnergy with scale 0): the law EDLM's
    sampler draws from is then exactly JOINT, and its bound is MDLM's, tight. With any other energy
    and a finite k the sampler's law is not JOINT: even the exact energy moves the exact
    one-position marginals, so B_k(x) bounds -log of the sampler's own law, not -log JOINT(x)
    for every x (tests/test_edlm.py checks those energies exactly)."""
    return ExactEDLM(ExactDenoiser(JOINT, vocab=method.vocab_size, mask_id=method.mask_id),
                     ExactEnergy(JOINT, mask_id=method.mask_id, scale=0.0))


EXACT_MODELS: dict[str, Callable] = {"ar": _exact_ar, "mdlm": _exact_mdlm, "sedd": _exact_sedd,
                                     "bd3": _exact_bd3, "edlm": _exact_edlm}
"""method name -> callable(method) -> a model that is exact for JOINT (data symbols 0..V-1, L = 3)
with that method's parameterisation; the method is built with vocab_size = V + 1, mask_id = MASK,
bos_id = pad_id = 0 (see tests/test_contract.py). New methods add an entry."""


# --------------------------------------------------------------------------- a real tiny backbone

def tiny_transformer(time_conditioning=False, vocab=11, max_len=8, seed=0, n_layers=1):
    """A gated backbone (the diffusion default) with its zero-initialised gates and output layer
    perturbed, so that its output depends on the input and on sigma."""
    from ddlm.config import ModelConfig
    from ddlm.nn.transformer import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, max_len=max_len, dim=32, n_layers=n_layers, n_heads=2,
                      time_conditioning=time_conditioning, block="gated")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------ devices

import pytest  # noqa: E402  (only the fixture below needs it)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device this machine has: the CPU, and CUDA where torch sees a GPU."""
    return torch.device(request.param)


def tiny_built(name: str, model: dict, seq_len: int, seed: int = 0, perturb: float = 0.0):
    """(run, tokenizer, method, model) of method `name` on the char tokenizer, as the trainer builds
    them, with the model options `model`; with `perturb`, every parameter gets N(0, perturb^2)
    noise (so zero-initialised gates and head no longer hide the input)."""
    from ddlm.build import build_method, complete_model_config
    from ddlm.config import make_config
    from ddlm.data import build_tokenizer

    run = make_config(base={"method": name, "model": dict(model), "data": {"seq_len": seq_len}})
    tokenizer = build_tokenizer(run.data.tokenizer)
    method = build_method(run, tokenizer)
    run = complete_model_config(run, method, tokenizer.vocab_size)
    torch.manual_seed(seed)
    network = method.build_model(run.model)
    if perturb:
        with torch.no_grad():
            for p in network.parameters():
                p.add_(perturb * torch.randn_like(p))
    return run, tokenizer, method, network
