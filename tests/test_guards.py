"""Guards: each test pins one piece of math to an exact quantity derived here, independently of the
code under test, so that breaking that piece turns the test red (mutation-checked, see each docstring).

Only stable interfaces are used: `method.loss`, `method.nll_bound`, the method constructors, the
Transformer's forward/new_cache, `summarize`/`evaluate_likelihood`, EMA, `lr_at`, `gumbel_argmax`,
`make_config`, `train`, `Trainer._train_step` and `ddlm.cli.main`. "Models" here are plain callables
`model(tokens, *, sigma=None, mask=None, **kw) -> logits (B, L, V)`; those that read sigma accept it
as (B,), (B, 1) or (B, L).
"""
import copy
import itertools
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from ddlm.config import ModelConfig, TrainConfig, make_config
from ddlm.eval.likelihood import evaluate_likelihood, summarize
from ddlm.methods.ar import AR, ARConfig
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.sedd import SEDD, SEDDConfig
from ddlm.nn.transformer import Transformer
from ddlm.sampling.base import gumbel_argmax
from ddlm.train.ema import EMA
from ddlm.train.optim import lr_at


# ------------------------------------------------------------------------------------ helpers

def sigma_rows(sigma: torch.Tensor, rows: int) -> torch.Tensor:
    """sigma given as (B,), (B, 1) or (B, L) -> (B,) float64 (one noise level per row)."""
    return sigma.detach().double().reshape(rows, -1)[:, 0]


def sigma_grid(sigma: torch.Tensor, shape) -> torch.Tensor:
    """sigma given as (B,), (B, 1) or (B, L) -> (B, L) float64."""
    B, L = shape
    s = sigma.detach().double().reshape(B, -1)
    return s.expand(B, L) if s.shape[1] == 1 else s


def unigram_model(log_q: torch.Tensor, extra_logit: float = 0.0):
    """A context-free denoiser: every position gets the logits log_q (over the non-MASK ids) + c,
    and the MASK id (the last one) a large logit that SUBS must ignore."""

    def model(z, *, sigma=None, mask=None, **kw):
        B, L = z.shape
        logits = torch.cat([log_q + extra_logit, torch.tensor([7.0], dtype=log_q.dtype)])
        return logits.expand(B, L, -1).clone()

    return model


def tiny_corpus(path, text: str | None = None):
    path.write_text(text or ("the quick brown fox jumps over the lazy dog while a bored cat sleeps\n" * 120))
    return path


def tiny_run(corpus, method="ar", **train):
    return make_config(base={
        "method": method, "data": {"corpus": str(corpus), "seq_len": 16},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "ckpt_every": 0,
                  "eval_batches": 1, "progress": False, "dtype": "fp32", "ema": 0.0, **train}})


# ====================================================== 1. MDLM discrete-time grid and L_T

# A tiny correlated joint over V=3 symbols at L=3 positions; MASK is id 3.
V1, L1, MASK1 = 3, 3, 3
SEQS1 = torch.tensor(list(itertools.product(range(V1), repeat=L1)))  # (27, 3)


def dirichlet_joint(n: int, seed: int, concentration: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((n,), concentration, dtype=torch.float64), generator=g)
    return x / x.sum()


JOINT1 = dirichlet_joint(V1 ** L1, seed=3, concentration=0.5)


def conditional_vector(x: tuple, visible: list[int], i: int) -> torch.Tensor:
    """(V1,) p(x_i = v | x_visible) summed out of the joint table."""
    table = JOINT1.view(V1, V1, V1)
    index = [slice(None)] * L1
    for j in visible:
        index[j] = x[j]
    sub = table[tuple(index)]  # dims of the non-visible positions, in order
    free = [j for j in range(L1) if j not in visible]
    keep = free.index(i)
    others = tuple(d for d in range(sub.dim()) if d != keep)
    marg = sub.sum(dim=others) if others else sub  # (sum over dim=() would sum everything)
    return marg / marg.sum()


class ExactDenoiser:
    """logits = log p(x_l | unmasked positions of z): the exact SUBS target of JOINT1."""

    def __call__(self, z, *, sigma=None, mask=None, **kw):
        compatible = ((z[:, None, :] == MASK1) | (z[:, None, :] == SEQS1[None])).all(-1)  # (B, 27)
        post = compatible * JOINT1
        post = post / post.sum(1, keepdim=True)
        probs = torch.einsum("bs,slv->blv", post, F.one_hot(SEQS1, V1 + 1).double())
        logits = probs.clamp_min(1e-300).log()
        logits[..., MASK1] = 5.0  # SUBS must zero the MASK probability whatever the backbone says
        return logits


def categorical_kl(q: torch.Tensor, p: torch.Tensor) -> float:
    keep = q > 0
    return float((q[keep] * (q[keep] / p[keep]).log()).sum())


def cosine_alpha(t: float, eps: float) -> float:
    """alpha_t = eps + (1 - eps) cos(pi t / 2) (MDLM's cosine schedule)."""
    return eps + (1 - eps) * math.cos(math.pi * t / 2)


def discrete_nelbo_by_kl_chain(x: tuple, T: int, eps: float) -> float:
    """MDLM eq. 10 from its definition: sum_i E_{z_t ~ q(.|x)} KL(q(z_s | z_t, x) || p_theta(z_s | z_t))
    with the exact denoiser, t = i/T, s = (i-1)/T, the cosine alpha_t, exact over all 2^L mask
    patterns, each KL computed from the full (V+1)-way categorical transition vectors."""
    total = 0.0
    for i in range(1, T + 1):
        a_t, a_s = cosine_alpha(i / T, eps), cosine_alpha((i - 1) / T, eps)
        for bits in itertools.product([False, True], repeat=L1):
            k = sum(bits)
            prob = (1 - a_t) ** k * a_t ** (L1 - k)
            visible = [j for j in range(L1) if not bits[j]]
            for l in (j for j in range(L1) if bits[j]):
                x_theta = conditional_vector(x, visible, l)
                q = torch.zeros(V1 + 1, dtype=torch.float64)
                q[x[l]] = (a_s - a_t) / (1 - a_t)
                q[MASK1] = (1 - a_s) / (1 - a_t)
                p = torch.zeros(V1 + 1, dtype=torch.float64)
                p[:V1] = (a_s - a_t) / (1 - a_t) * x_theta
                p[MASK1] = (1 - a_s) / (1 - a_t)
                total += prob * categorical_kl(q, p)
    return total


def times_from_sigma(sigma: torch.Tensor, rows: int, eps: float) -> torch.Tensor:
    """Log-linear schedule: 1 - exp(-sigma_bar) = (1 - eps) t."""
    return -torch.expm1(-sigma_rows(sigma, rows)) / (1 - eps)


def test_mdlm_discrete_times_are_exactly_the_grid_and_a_batch_of_T_covers_it():
    """Mutation caught: MDLM.sample_t returning (floor(uT)+1)/(T+1) (or floor(uT)/T): the times
    must be i/T, i = 1..T, and T low-discrepancy draws must hit every i once."""
    T, eps = 8, 1e-3
    m = MDLM(MDLMConfig(discrete_steps=T, eps=eps, time_conditioning=True), vocab_size=4, mask_id=3,
             bos_id=0, pad_id=0)
    seen = []

    def spy(z, *, sigma=None, mask=None, **kw):
        seen.append(times_from_sigma(sigma, len(z), eps))
        return torch.zeros(*z.shape, 4)

    x0 = torch.zeros(T, 5, dtype=torch.long)
    for seed in range(6):
        seen.clear()
        torch.manual_seed(seed)
        m.loss(spy, x0)
        t = torch.cat(seen)
        assert t.numel() == T
        assert (t * T - (t * T).round()).abs().max() < 1e-5, t * T
        assert sorted((t * T).round().long().tolist()) == list(range(1, T + 1))
    # the bound's B * n_samples draws are one low-discrepancy set as well
    seen.clear()
    m.nll_bound(spy, torch.zeros(2, 5, dtype=torch.long), n_samples=T // 2,
                generator=torch.Generator().manual_seed(1))
    t = torch.cat(seen)
    assert sorted((t * T).round().long().tolist()) == list(range(1, T + 1))
    assert (t * T - (t * T).round()).abs().max() < 1e-5


def test_mdlm_discrete_bound_with_exact_denoiser_equals_its_kl_chain():
    """nll_bound with mdlm.discrete_steps=T and the exact denoiser estimates the T-step NELBO
    (eq. 10), whose value is computed here from its definition as a chain of categorical KLs. With
    n_samples = T every sequence sees each grid time once, so only z_t is random. (Cosine schedule:
    under the log-linear one the discrete weight T (alpha_s - alpha_t)/(1 - alpha_t) = 1/t = w(t).)
    Mutations caught: a wrong discrete weight (the continuous w(t), a missing factor T,
    s = t - 1/(T+1)) or grid ((floor(uT)+1)/(T+1))."""
    T, eps, R = 4, 1e-6, 400
    prior = L1 * cosine_alpha(1.0, eps) * math.log(V1)  # KL(q(z_1|x) || (1 - a_1) MASK + a_1 Uniform)
    ref = torch.tensor([discrete_nelbo_by_kl_chain(tuple(x), T, eps) for x in SEQS1.tolist()],
                       dtype=torch.float64) + prior
    # a bound on the model's NLL, so above the data entropy on average (strictly: T is finite)
    assert ((ref + JOINT1.log()) * JOINT1).sum() > 1e-2
    assert ((ref - prior + JOINT1.log()) * JOINT1).sum() > 1e-2
    m = MDLM(MDLMConfig(discrete_steps=T, schedule="cosine", eps=eps), vocab_size=V1 + 1, mask_id=MASK1,
             bos_id=0, pad_id=0)
    x0 = SEQS1.repeat(R, 1)
    out = m.nll_bound(ExactDenoiser(), x0, n_samples=T, generator=torch.Generator().manual_seed(0))
    per_x = out.nll.view(R, len(SEQS1))
    mean, se = per_x.mean(0), per_x.std(0) / math.sqrt(R)
    assert ((mean - ref).abs() < 4.5 * se + 1e-9).all(), ((mean - ref) / se)
    overall_se = (se ** 2).sum().sqrt() / len(SEQS1)
    assert abs((mean - ref).mean()) < 4 * overall_se


# ====================================================== 2. padded rows == truncated rows

LENGTHS = [8, 5, 3]  # counted prefix of each row; the tail is padding


def padded_batch(vocab: int, gen_seed: int = 0):
    g = torch.Generator().manual_seed(gen_seed)
    x0 = torch.randint(0, vocab, (len(LENGTHS), 8), generator=g)
    keep = torch.zeros(len(LENGTHS), 8)
    for b, n in enumerate(LENGTHS):
        keep[b, :n] = 1
    return x0, keep


def test_ar_padded_bound_equals_the_truncated_rows():
    """Mutation caught: AR.loss / AR.nll_bound ignoring loss_mask (tail tokens summed, or counted)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=8, dim=32, n_layers=2, n_heads=2)).eval()
    ar = AR(ARConfig(), vocab_size=11, mask_id=9, bos_id=10, pad_id=9)
    x0, keep = padded_batch(9)
    x0[1, 5:] = 9  # pad ids in the tail of row 1 (row 2 keeps arbitrary tokens in its tail)
    out = ar.nll_bound(model, x0, loss_mask=keep)
    assert out.exact and out.nll.dtype == torch.float64
    assert torch.equal(out.tokens, torch.tensor(LENGTHS, dtype=torch.float64))
    for b, n in enumerate(LENGTHS):
        alone = ar.nll_bound(model, x0[b:b + 1, :n])
        assert alone.tokens.item() == n
        assert math.isclose(out.nll[b].item(), alone.nll.item(), rel_tol=1e-5), (b, out.nll, alone.nll)
        # and both equal the chain rule summed by hand over the counted prefix
        inp = torch.cat([torch.tensor([10]), x0[b, :n - 1]])[None]
        logp = torch.log_softmax(model(inp, mask="causal").double(), -1)[0]
        by_hand = -logp[torch.arange(n), x0[b, :n]].sum().item()
        assert math.isclose(out.nll[b].item(), by_hand, rel_tol=1e-5)


@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_diffusion_padded_bound_equals_the_truncated_rows(name):
    """Context-free denoiser p_theta = q at every position. Under the log-linear schedule
    w(t) (1 - alpha_t) = 1 - eps for every t, so E[bound] = sum over counted tokens of
    (1 - eps)(-log q(x_l)) + eps log(V - 1) (the prior KL to the absorbing base) exactly, and
    truncating a row to its counted prefix cannot change it.
    Mutation caught: DiffusionMethod.nll_bound ignoring loss_mask in the sum / the prior / tokens."""
    V, MASK, eps, R = 6, 5, 1e-3, 300
    q = torch.tensor([0.55, 0.25, 0.12, 0.07, 0.01], dtype=torch.float64)
    kw = dict(vocab_size=V, mask_id=MASK, bos_id=0, pad_id=4)
    if name == "mdlm":
        m = MDLM(MDLMConfig(eps=eps, sampling_eps=0.3), **kw)
        model = unigram_model(q.log())
    else:  # log s = logits - log expm1(sigma_bar) - log n: softmax scores q / expm1(sigma_bar)
        m = SEDD(SEDDConfig(eps=eps, sampling_eps=0.3, time_conditioning=False), **kw)
        model = unigram_model(q.log(), math.log(V - 1))
    prior = eps * math.log(V - 1)
    x0, keep = padded_batch(4)
    x0[:, -3:] = 4  # the padding tail holds the rarest symbol: 4.6 nats per token if counted
    cost = -q.log()[x0]  # (B, L)
    ref = (((1 - eps) * cost + prior) * keep).sum(1)

    g = torch.Generator().manual_seed(0)
    out = m.nll_bound(model, x0.repeat(R, 1), n_samples=4, loss_mask=keep.repeat(R, 1), generator=g)
    assert torch.equal(out.tokens, torch.tensor(LENGTHS, dtype=torch.float64).repeat(R))
    per = out.nll.view(R, len(LENGTHS))
    se = per.std(0) / math.sqrt(R)
    assert ((per.mean(0) - ref).abs() < 4 * se + 1e-9).all(), (per.mean(0), ref, se)
    assert (se < 0.5).all()  # (a counted tail would add 3 x 4.6 nats)
    for b, n in enumerate(LENGTHS):
        alone = m.nll_bound(model, x0[b:b + 1, :n].repeat(R, 1), n_samples=4, generator=g)
        assert torch.equal(alone.tokens, torch.full((R,), float(n), dtype=torch.float64))
        assert abs(alone.nll.mean() - ref[b]) < 4 * alone.nll.std() / math.sqrt(R) + 1e-9
        assert abs(alone.nll.mean() - per[:, b].mean()) < 4 * (se[b] + alone.nll.std() / math.sqrt(R))
    # loss() follows the same rule: its token_nll is zero on the tail and its weights are the mask
    lo = m.loss(model, x0, t=torch.tensor([0.5, 0.7, 0.9]), loss_mask=keep)
    assert torch.equal(lo.weights.float(), keep) and (lo.token_nll[keep == 0] == 0).all()


# ====================================================== 3. SEDD's bound includes its prior term

def x0_aware_exact_scores(x0: torch.Tensor, graph: str, n_states: int, vocab: int, mask_id: int):
    """A 'model' that knows the clean x0 and returns the exact conditional ratios
    r_y = p_{t|0}(y | x0) / p_{t|0}(x_t | x0): every denoising score-entropy term is then 0, so the
    Monte-Carlo part of the bound vanishes and the bound is its prior term alone."""

    def model(z, *, sigma=None, mask=None, **kw):
        B, L = z.shape
        assert z.shape == x0.shape
        if graph == "absorbing":
            # log s = logits - log expm1(sigma_bar) - log n; r = 1/expm1(sigma_bar) at y = x0, else 0
            logits = torch.full((B, L, vocab), -1e4, dtype=torch.float64)
            logits.scatter_(-1, x0[..., None], math.log(n_states))
            return logits
        sb = sigma_grid(sigma, (B, L))[..., None]  # (B, L, 1)
        member = torch.ones(vocab, dtype=torch.float64)
        member[mask_id] = 0
        p = F.one_hot(x0, vocab).double() * torch.exp(-sb) - torch.expm1(-sb) / n_states * member
        ratio = p / p.gather(-1, z[..., None])
        return ratio.clamp_min(1e-300).log()

    return model


@pytest.mark.parametrize("name,graph", [("sedd", "absorbing"), ("sedd", "uniform"), ("mdlm", "absorbing")])
def test_bound_is_exactly_its_prior_kl_when_the_model_is_exact(name, graph):
    """A model that knows x0 makes every Monte-Carlo term 0 (SEDD: zero score entropy; MDLM:
    x_theta = one-hot on x0), so the bound is its prior term alone. With eps = 0.3,
    alpha_1 = e^{-sigma_bar(1)} = 0.3 and the prior KL is large. By hand:
    p_{1|0}(. | x0) = 0.3 [y = x0] + 0.7 [y = MASK] (absorbing; base 0.7 MASK + 0.3 Uniform(tokens))
    or 0.3 [y = x0] + 0.7 / N (uniform; base Uniform(N)). Counted tokens only (loss_mask).
    Mutations caught: nll_bound dropping prior_nll, the prior evaluated at the wrong time / alpha
    (SEDD's graph or MDLM's own prior_nll), or not masked by loss_mask."""
    V, MASK, eps = 7, 6, 0.3
    ids = dict(vocab_size=V, mask_id=MASK, bos_id=0, pad_id=0)
    if name == "sedd":
        m = SEDD(SEDDConfig(graph=graph, schedule="loglinear", eps=eps,
                            time_conditioning=(graph == "uniform")), **ids)
    else:
        m = MDLM(MDLMConfig(schedule="loglinear", eps=eps), **ids)
    n = V - 1  # absorbing: tokens are every id but MASK; uniform: the states are every id but MASK
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, n, (6, 5), generator=g)
    keep = torch.ones(6, 5)
    keep[1, 3:] = 0
    keep[4, 1:] = 0
    a1 = eps
    kl = []
    for x in range(n):
        p1 = torch.zeros(V, dtype=torch.float64)
        if graph == "absorbing":
            p1[x], p1[MASK] = a1, 1 - a1
            base = torch.full((V,), a1 / n, dtype=torch.float64)
            base[MASK] = 1 - a1
        else:
            p1[:n] = (1 - a1) / n
            p1[x] += a1
            base = torch.full((V,), 1.0 / n, dtype=torch.float64)
            base[MASK] = 0.0
        kl.append(categorical_kl(p1, base))
    kl = torch.tensor(kl, dtype=torch.float64)
    expected = (kl[x0] * keep.double()).sum(1)
    assert expected.min() > 0.1  # a big prior term
    model = x0_aware_exact_scores(x0, graph, n, V, MASK)
    out = m.nll_bound(model, x0, n_samples=3, loss_mask=keep, generator=g)
    torch.testing.assert_close(out.nll, expected, rtol=1e-9, atol=1e-9)
    # the Monte-Carlo part really is 0 ...
    lo = m.loss(model, x0, t=torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.99]))
    assert lo.token_nll.abs().max() < 1e-5
    # ... and without the mask every token carries its prior KL
    full = m.nll_bound(model, x0, generator=g)
    torch.testing.assert_close(full.nll, kl[x0].sum(1), rtol=1e-9, atol=1e-9)


# ====================================================== 4. precision: float64 bound and Gumbel

def test_ar_bound_is_summed_in_float64():
    """One token costs exactly 1e8 nats and seven cost ln 2 each: the float64 total 1e8 + 7 ln 2 is
    exact to ~1e-7 while a float32 sum loses the ln 2's (ulp(1e8) = 8).
    Mutation caught: AR.nll_bound summing token_nll in float32 (`.sum(1).double()`)."""
    V, L = 5, 8

    def model(tokens, *, sigma=None, mask=None, **kw):
        B, n = tokens.shape
        logits = torch.full((B, n, V), -1e4)
        logits[:, :, 0] = 0.0
        logits[:, :, 1] = 0.0  # targets 0 and 1: a fair coin -> ln 2
        logits[:, 0, 1] = -1e8  # first target 1 costs 1e8 exactly
        return logits

    ar = AR(ARConfig(), vocab_size=V, mask_id=3, bos_id=4, pad_id=3)
    x0 = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0]])
    out = ar.nll_bound(model, x0)
    assert out.nll.dtype == torch.float64
    assert abs(out.nll.item() - (1e8 + 7 * math.log(2))) < 1e-4, out.nll.item() - 1e8


@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_diffusion_bound_is_float64_to_1e_12(name):
    """A deterministic case: MDLM with one discrete step (t = 1, weight 1) and SEDD with all times
    in [1 - 1e-13, 1) (weight 1/t), eps = 1e-12, so every token is masked and the bound is, in
    float64 from the float32 logits l of a context-free model: MDLM sum_l -log softmax(l)[x_l];
    SEDD sum_l (sum_y e^{l_y} - 1 - l_{x_l}) (DSE with s = e^l / expm1(sigma_bar)); plus the prior
    KL eps log(V - 1) per token. Mutation caught: the bound's log-probabilities / score entropy / accumulator in
    float32 (e.g. nll_bound calling sampled_nll with dtype=torch.float32, or a float32 `total`)."""
    V, MASK, L = 9, 8, 7
    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(V - 1, generator=g) * 2, -1)  # float32 logits
    x0 = torch.randint(0, V - 1, (4, L), generator=g)
    kw = dict(vocab_size=V, mask_id=MASK, bos_id=0, pad_id=0)
    prior = 1e-12 * math.log(V - 1) * L
    if name == "mdlm":
        m = MDLM(MDLMConfig(discrete_steps=1, eps=1e-12), **kw)
        model = unigram_model(log_q)
        ref = -torch.log_softmax(log_q.double(), -1)[x0].sum(1) + prior
    else:
        m = SEDD(SEDDConfig(eps=1e-12, sampling_eps=1 - 1e-13, time_conditioning=False), **kw)
        model = unigram_model(log_q, math.log(V - 1))
        ell = model(x0[:1, :1])[0, 0, :V - 1].double() - math.log(V - 1)  # what the method sees
        ref = (ell.exp().sum() - 1 - ell[x0]).sum(1) + prior
    out = m.nll_bound(model, x0, n_samples=2, generator=g)
    assert out.nll.dtype == torch.float64
    torch.testing.assert_close(out.nll, ref, rtol=1e-12 if name == "mdlm" else 1e-11, atol=0.0)


# seed 87's float64 draws of shape (2**18, 4) hold u = 0.99999997065 at [158582, 1]; that u rounds
# to 1.0 in float32, so float32 Gumbel noise there is +inf instead of 17.3.
U_SEED, U_SHAPE, U_ROW, U_COL = 87, (2 ** 18, 4), 158582, 1


def gumbel_by_hand(logp: torch.Tensor, seed: int, *, u_dtype=torch.float64) -> torch.Tensor:
    u = torch.rand(logp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    u = u.to(u_dtype).double()
    return (logp.double() - torch.log(-torch.log(u))).argmax(-1)


def test_gumbel_argmax_is_the_float64_draw_by_hand():
    """gumbel_argmax(logp, g) == argmax(logp + G), G = -log(-log u), u ~ torch.rand float64 from the
    same generator, on two cases where float32 would change the draw: a u within 3e-8 of 1 (float32
    rounds it to 1.0: infinite noise) and near-tied logits 1e6 vs 1e6 + 0.03 (equal in float32).
    Mutations caught: uniforms drawn in float32, u or the noise rounded to float32, logits rounded
    to float32."""
    logp = torch.zeros(U_SHAPE, dtype=torch.float64)
    logp[U_ROW, U_COL] = -40.0
    ref = gumbel_by_hand(logp, U_SEED)
    ref32 = gumbel_by_hand(logp, U_SEED, u_dtype=torch.float32)
    assert ref[U_ROW] != U_COL and ref32[U_ROW] == U_COL  # the case float32 gets wrong
    out = gumbel_argmax(logp, torch.Generator().manual_seed(U_SEED))
    assert torch.equal(out, ref)

    tied = torch.tensor([1e6, 1e6 + 0.03], dtype=torch.float64).expand(4096, 2)
    ref = gumbel_by_hand(tied, 5)
    ref32 = gumbel_by_hand(tied.float(), 5)
    assert (ref != ref32).sum() >= 10
    assert torch.equal(gumbel_argmax(tied, torch.Generator().manual_seed(5)), ref)


# ====================================================== 5. K Monte-Carlo samples, K distinct times

def test_each_sequence_gets_n_samples_distinct_stratified_times():
    """With n_samples = K, the K draws of one sequence use K different times, one in each stratum
    [j/K, (j+1)/K) of u (t = sampling_eps + (1 - sampling_eps) u). Rows are told apart by their
    tokens (row b is all b; eps = 0.5 keeps half of them unmasked).
    Mutations caught: one t per sequence reused for all K samples; the B*K stratified times dealt
    out so that one sequence's K times fall in one stratum (view(B, K).T)."""
    B, K, L, eps, se = 3, 8, 16, 0.5, 1e-3
    m = MDLM(MDLMConfig(eps=eps, sampling_eps=se, time_conditioning=True), vocab_size=B + 1, mask_id=B,
             bos_id=0, pad_id=0)
    times = {b: [] for b in range(B)}

    def spy(z, *, sigma=None, mask=None, **kw):
        t = times_from_sigma(sigma, len(z), eps)
        for row, tt in zip(z, t.tolist()):
            visible = row[row != B]
            assert len(visible) and (visible == visible[0]).all()
            times[int(visible[0])].append(tt)
        return torch.zeros(*z.shape, B + 1)

    x0 = torch.arange(B)[:, None].expand(B, L).clone()
    for seed in range(3):
        for b in times:
            times[b].clear()
        m.nll_bound(spy, x0, n_samples=K, generator=torch.Generator().manual_seed(seed))
        for b, ts in times.items():
            u = (torch.tensor(ts, dtype=torch.float64) - se) / (1 - se)
            assert len(ts) == K
            assert sorted(torch.floor(u * K).long().clamp(0, K - 1).tolist()) == list(range(K)), (b, u)


# ====================================================== 6. `ddlm eval --eval.t_samples=K`

TINY_CLI = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16",
            "--train.batch_size=4", "--train.eval_every=0", "--train.eval_batches=1", "--train.dtype=fp32"]


def test_cli_eval_honours_t_samples(tmp_path, capsys, monkeypatch):
    """Mutation caught: the evaluator passing n_samples=1 (or the default) to nll_bound instead of
    eval.t_samples, while the report still says K."""
    from ddlm.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt")
    out = tmp_path / "run"
    assert main(["train", "--method", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "5",
                 "--json", *TINY_CLI]) == 0
    capsys.readouterr()
    calls = []
    real = MDLM.nll_bound

    def spy(self, model, x0, *, n_samples=1, **kw):
        calls.append(n_samples)
        return real(self, model, x0, n_samples=n_samples, **kw)

    monkeypatch.setattr(MDLM, "nll_bound", spy)
    results = {}
    for k in (1, 16):
        calls.clear()
        assert main(["eval", str(out), "--json", f"--eval.t_samples={k}", "--eval.max_batches=3",
                     "--eval.batch_size=4", "--eval.seed=0"]) == 0
        results[k] = json.loads(capsys.readouterr().out)
        assert calls and all(c == k for c in calls), calls
        assert results[k]["t_samples"] == k and results[k]["tokens"] == 3 * 4 * 16
    assert results[1]["bpc"] != results[16]["bpc"]
    # more time samples: less Monte-Carlo noise in the per-sequence bounds
    assert results[16]["bpc_stderr"] < results[1]["bpc_stderr"]


# ====================================================== 7. bits per character

def test_summarize_is_the_token_weighted_ratio_in_bits_per_character():
    """Mutations caught: BPC multiplying by chars_per_token, nats not converted to bits, the mean
    of per-sequence ratios instead of the ratio of sums, a wrong standard error."""
    nll = torch.tensor([3.0, 5.0, 2.5, 9.0], dtype=torch.float64)
    tokens = torch.tensor([2.0, 4.0, 1.0, 5.0], dtype=torch.float64)
    cpt = 1.7
    r = summarize(nll, tokens, cpt, exact=False, t_samples=3)
    ratio = 19.5 / 12.0
    assert math.isclose(r.nll_per_token, ratio, rel_tol=1e-15)
    assert math.isclose(r.bpc, ratio / math.log(2) / cpt, rel_tol=1e-14)
    assert math.isclose(r.ppl, math.exp(ratio), rel_tol=1e-14)
    resid = [a - ratio * b for a, b in zip(nll.tolist(), tokens.tolist())]
    se_nats = math.sqrt(sum(e * e for e in resid) * 4 / 3) / 12.0
    assert math.isclose(r.bpc_stderr, se_nats / math.log(2) / cpt, rel_tol=1e-12)
    assert (r.tokens, r.sequences, r.exact, r.t_samples) == (12, 4, False, 3)


def test_end_to_end_bpc_with_a_byte_tokenizer_counts_characters(tmp_path):
    """Byte tokenizer on text full of multi-byte characters (chars per token ~0.7): BPC must be
    total nats / ln 2 / characters scored, the characters being tokens * (chars / bytes of the
    split's text). Nats are summed here from the AR chain rule by hand.
    Mutations caught: chars_per_token inverted (tokens per char) in the dataset or in summarize."""
    from ddlm.build import prepare_data
    from ddlm.data import load_corpus

    line = "naïve café — Ærøskøbing, über straße; 日本語の文 and plain ascii words\n"
    corpus = tiny_corpus(tmp_path / "u.txt", line * 60)
    run = make_config(base={"method": "ar", "data": {"corpus": str(corpus), "tokenizer": "byte", "seq_len": 16}})
    tok, data = prepare_data(run)
    valid = data["valid"]
    text = "".join(load_corpus(str(corpus)).split("valid"))
    chars_per_byte = len(text) / len(text.encode("utf-8"))
    assert chars_per_byte < 0.9
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, max_len=16, dim=32, n_layers=1, n_heads=2))
    ar = AR(ARConfig(), vocab_size=tok.vocab_size, mask_id=tok.mask_id, bos_id=tok.bos_id, pad_id=tok.pad_id)
    result = evaluate_likelihood(ar, model, valid, batch_size=8)
    x = torch.as_tensor(valid.tokens.astype("int64"))
    with torch.no_grad():
        inp = torch.cat([torch.full((len(x), 1), tok.bos_id), x[:, :-1]], 1)
        logp = torch.log_softmax(model.eval()(inp, mask="causal").double(), -1)
    nats = -logp.gather(-1, x[..., None]).sum().item()
    chars = x.numel() * chars_per_byte
    assert result.tokens == x.numel()
    assert math.isclose(result.bpc, nats / math.log(2) / chars, rel_tol=1e-5), (result.bpc, nats / math.log(2) / chars)


# ====================================================== 8. chunked KV-cached logits

def test_chunked_kv_cache_equals_full_causal_forward():
    """Chunks of 3, 4 and 2 tokens through the KV cache (several new queries after an offset) ==
    one causal forward. Mutation caught: the causal mask with a cache ignoring the offset (query i
    of a chunk seeing only keys <= i), or aligning it top-left (is_causal on a non-square mask)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=2, n_heads=2)).eval()
    x = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x, mask="causal")
        cache = model.new_cache(2, 16)
        pieces, start = [], 0
        for size in (3, 4, 2):
            if start:  # a read-only look at the next chunk first: same logits, nothing stored
                peek = model(x[:, start:start + size], mask="causal", cache=cache, cache_write=False)
                torch.testing.assert_close(peek, full[:, start:start + size], atol=1e-5, rtol=1e-5)
                assert cache.length == start
            pieces.append(model(x[:, start:start + size], mask="causal", cache=cache))
            start += size
            assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


# ====================================================== 9. adaLN gates

@pytest.mark.parametrize("block", ["plain", "gated"])
def test_adaln_gates_scale_exactly_their_branch(block):
    """With zero gates every block is the identity whatever the shift/scale (output = head(norm(
    embed))); a gate g scales its branch exactly: (block output - input) / g does not depend on g.
    Mutations caught: a gate ignored (h + branch instead of h + g * branch), or applied as (1 + g)."""
    D = 32
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=8, dim=D, n_layers=2, n_heads=2, block=block,
                                    time_conditioning=True)).eval()
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.7])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))  # (gated: zero-init)
        for block in model.blocks:  # shift/scale biases non-zero, gates zero
            bias = block.modulation.bias
            bias.copy_(torch.randn(6 * D, generator=g) * 0.5)
            bias[2 * D:3 * D] = 0.0
            bias[5 * D:6 * D] = 0.0
        out = model(x, sigma=sigma, mask="bidirectional")
        identity = model.head(model.norm(model.embed(x)))
    torch.testing.assert_close(out, identity, atol=1e-5, rtol=1e-5)

    block = model.blocks[0]
    seen = []
    hook = block.register_forward_hook(lambda mod, args, output: seen.append((args[0].clone(), output.clone())))
    try:
        for index in (2, 5):  # the attention gate, then the MLP gate, each alone
            branches = []
            for gate in (torch.full((D,), 0.5), torch.rand(D, generator=g) + 0.2):
                with torch.no_grad():
                    block.modulation.bias[index * D:(index + 1) * D] = gate
                    seen.clear()
                    model(x, sigma=sigma, mask="bidirectional")
                    h_in, h_out = seen[0]
                    branches.append((h_out - h_in) / gate)
                    block.modulation.bias[index * D:(index + 1) * D] = 0.0
            assert branches[0].abs().mean() > 1e-3  # the branch is not trivially zero
            torch.testing.assert_close(branches[0], branches[1], atol=1e-5, rtol=1e-4)
    finally:
        hook.remove()


# ====================================================== 10. EMA

@pytest.mark.parametrize("decay", [0.1, 0.999])
def test_ema_update_is_its_formula(decay):
    """shadow <- d shadow + (1 - d) w, d = min(decay, (1 + n)/(10 + n)), n = updates so far
    (counting this one). Mutations caught: decay and 1 - decay swapped, the warm-up off by one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay)
    shadow = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(decay, (1 + n) / (10 + n))
        for k, w in model.state_dict().items():
            shadow[k] = d * shadow[k] + (1 - d) * w.double()
            torch.testing.assert_close(ema.shadow[k].double(), shadow[k], rtol=1e-6, atol=1e-6)


def test_ema_applied_swaps_in_the_shadow_and_restores_exactly():
    """Mutation caught: `applied` not restoring the training weights (or not loading the shadow)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    training = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(training[k], ema.shadow[k]) for k in training)
    with ema.applied(model) as inside:
        for k, v in inside.state_dict().items():
            assert torch.equal(v, ema.shadow[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k])


# ====================================================== 11. gradient accumulation

def test_grad_accumulation_equals_one_large_batch(tmp_path):
    """train.micro_batch_size=2 of a batch of 4 (two micro-batches) == one micro-batch of 4 == the
    gradient of the mean loss over the 4 sequences, computed here from the initial weights (AR: a
    deterministic loss). Mutations caught: micro-batch losses not divided by the accumulation
    count; gradients zeroed per micro-batch; a micro-batch reading the wrong rows."""
    from ddlm.train.loop import Trainer

    corpus = tiny_corpus(tmp_path / "c.txt")
    accum = Trainer(tiny_run(corpus, batch_size=4, micro_batch_size=2, grad_clip=0.0), tmp_path / "a", quiet=True)
    large = Trainer(tiny_run(corpus, batch_size=4, grad_clip=0.0), tmp_path / "b", quiet=True)
    assert (accum.plan.accum, large.plan.accum) == (2, 1)
    initial = copy.deepcopy(accum.model)
    for a, b in zip(accum.model.state_dict().values(), large.model.state_dict().values()):
        assert torch.equal(a, b)
    rows = {}
    for name, trainer in (("accum", accum), ("large", large)):
        real = trainer.loader.take
        rows[name] = []

        def recording(r, real=real, store=rows[name]):
            batch = real(r)
            store.append(batch.tokens.clone())
            return batch

        trainer.loader.take = recording
        trainer._train_step()
    x = torch.cat(rows["accum"])
    assert torch.equal(x, torch.cat(rows["large"])) and x.shape[0] == 4 and len(rows["accum"]) == 2
    ref = accum.method.loss(initial, x).loss
    ref.backward()
    for (name, p), q, r in zip(accum.model.named_parameters(), large.model.parameters(), initial.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(q.grad, r.grad, atol=1e-6, rtol=1e-5, msg=name)


# ====================================================== 12. warm-up and cosine

def test_lr_warmup_and_cosine_endpoints():
    """Mutations caught: warm-up starting at 0 (lr * step / warmup), ending below lr, or the cosine
    not reaching lr * min_lr_ratio."""
    cfg = TrainConfig(steps=100, lr=2e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert math.isclose(lr_at(0, cfg), 2e-3 / 10, rel_tol=1e-12)
    assert math.isclose(lr_at(4, cfg), 2e-3 * 5 / 10, rel_tol=1e-12)
    assert math.isclose(lr_at(9, cfg), 2e-3, rel_tol=1e-12)
    assert math.isclose(lr_at(10, cfg), 2e-3, rel_tol=1e-12)
    assert math.isclose(lr_at(55, cfg), 2e-4 + 0.5 * (2e-3 - 2e-4), rel_tol=1e-12)  # half-way down
    assert math.isclose(lr_at(100, cfg), 2e-4, rel_tol=1e-12)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(lr_at(0, TrainConfig(steps=10, lr=1e-3, warmup_steps=0)), 1e-3, rel_tol=1e-12)


def test_lr_constant_after_warmup_when_min_lr_ratio_is_one():
    """min_lr_ratio = 1 is the public code's schedule (benchmarks/mdlm_reference.py): lr at every
    step after the warm-up. Mutation caught: a floor that ignores min_lr_ratio."""
    cfg = TrainConfig(steps=100, lr=2e-3, warmup_steps=10, min_lr_ratio=1.0)
    assert math.isclose(lr_at(4, cfg), 2e-3 * 5 / 10, rel_tol=1e-12)
    assert all(math.isclose(lr_at(s, cfg), 2e-3, rel_tol=1e-12) for s in range(9, 120))


# ====================================================== 13. signal handlers

def test_signal_handlers_are_replaced_during_training_and_restored_after(tmp_path, monkeypatch):
    """Mutations caught: the trainer not restoring SIGTERM/SIGINT handlers after fit (or only on
    success: an exception inside a step must restore them too)."""
    from ddlm.train.loop import Trainer, train

    corpus = tiny_corpus(tmp_path / "c.txt")

    def sentinel_term(signum, frame):
        raise AssertionError("sentinel SIGTERM handler called")

    def sentinel_int(signum, frame):
        raise AssertionError("sentinel SIGINT handler called")

    old = {signal.SIGTERM: signal.getsignal(signal.SIGTERM), signal.SIGINT: signal.getsignal(signal.SIGINT)}
    during = []
    real = Trainer._train_step

    def spy(self):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        if getattr(self, "explode", False) and len(during) == 2:
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(Trainer, "_train_step", spy)
    try:
        signal.signal(signal.SIGTERM, sentinel_term)
        signal.signal(signal.SIGINT, sentinel_int)
        train(tiny_run(corpus, steps=2), tmp_path / "ok", quiet=True)
        assert len(during) == 2
        assert all(t is not sentinel_term and callable(t) and i is not sentinel_int and callable(i)
                   for t, i in during)
        assert signal.getsignal(signal.SIGTERM) is sentinel_term
        assert signal.getsignal(signal.SIGINT) is sentinel_int

        during.clear()
        monkeypatch.setattr(Trainer, "explode", True, raising=False)
        with pytest.raises(RuntimeError, match="boom"):
            train(tiny_run(corpus, steps=3), tmp_path / "boom", quiet=True)
        assert signal.getsignal(signal.SIGTERM) is sentinel_term
        assert signal.getsignal(signal.SIGINT) is sentinel_int
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
