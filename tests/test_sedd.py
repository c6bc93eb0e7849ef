"""SEDD against exact answers (METHODS.md §2, §7).

A tiny joint over 3 tokens and L = 2 positions: its exact concrete scores at every time are
computed in tests/conftest.py from a matrix exponential of the graph's rate matrix (independently
of ddlm/process/graphs.py). Fed those scores, the code's bound must equal -log p(x) by quadrature
over t, for the absorbing and the uniform graph. Absorbing SEDD with softmax scores must equal
MDLM's per-token loss (the parity of METHODS.md §2).
"""
import itertools
import json
import math

import pytest
import torch

from ddlm.config import ModelConfig
from ddlm.errors import ConfigError
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.sedd import SEDD, SEDDConfig, score_entropy
from ddlm.nn.transformer import Transformer

from conftest import ExactScores, all_sequences, dirichlet_joint, gauss_legendre, kernel

N, L, MASK = 3, 2, 3  # tokens 0..2, MASK = 3; the vocabulary has 4 ids
VOCAB = N + 1
SEQS = all_sequences(N, L)  # (9, 2)
JOINT = dirichlet_joint(N ** L, seed=0, concentration=0.4).view(N, N)


def marginal_table(graph: str, sigma_bar: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) p_t(z1, z2) = sum_x p(x) K(z1|x1) K(z2|x2)."""
    K = kernel(graph, sigma_bar)[:, :, :N]  # (B, 4, N)
    return torch.einsum("bya,bzc,ac->byz", K, K, JOINT)


def exact_scores(graph: str, n_tokens: int) -> ExactScores:
    """Exact scores of the two-position JOINT (conftest.ExactScores)."""
    return ExactScores(graph, n_tokens, joint=JOINT.reshape(-1), n_symbols=N, length=L)


def method(**kw) -> SEDD:
    return SEDD(SEDDConfig(**kw), vocab_size=VOCAB, mask_id=MASK, bos_id=0, pad_id=0)


def exact_bound(m: SEDD, graph: str, n_nodes: int) -> torch.Tensor:
    """(9,) the code's bound for every x0 with exact scores, exact over z_t, quadrature over t."""
    t, w = gauss_legendre(0.0, 1.0, n_nodes)
    states = list(range(VOCAB)) if graph == "absorbing" else list(range(N))
    zs = torch.tensor(list(itertools.product(states, repeat=L)))  # (Z, 2)
    S, Q, Z = len(SEQS), len(t), len(zs)
    x0 = SEQS[:, None, None].expand(S, Q, Z, L).reshape(-1, L)
    zt = zs[None, None].expand(S, Q, Z, L).reshape(-1, L)
    tt = t[None, :, None].expand(S, Q, Z).reshape(-1)
    sigma_bar = m.schedule.total_noise(tt)
    model = exact_scores(graph, m.graph.n_tokens if graph == "absorbing" else N)
    model.sigma_bar = sigma_bar
    dse = m.position_dse(model, x0, zt, tt[:, None]).sum(1)  # (S Q Z,)
    K = kernel(graph, sigma_bar)
    rows = torch.arange(len(x0))
    q = K[rows, zt[:, 0], x0[:, 0]] * K[rows, zt[:, 1], x0[:, 1]]  # q(z_t | x0)
    integrand = (m.schedule.rate(tt) * dse * q).view(S, Q, Z).sum(2)  # (S, Q)
    one = torch.ones((), dtype=torch.float64)
    prior = m.graph.prior_kl(SEQS, m.schedule.total_noise(one)).sum(1)
    return integrand @ w + prior


def test_bound_with_exact_scores_is_minus_log_p_absorbing():
    m = method(graph="absorbing", schedule="loglinear", eps=1e-7, time_conditioning=False)
    assert torch.allclose(exact_bound(m, "absorbing", 64), -JOINT.reshape(-1).log(), atol=1e-4)


def test_bound_with_exact_scores_is_minus_log_p_uniform():
    m = method(graph="uniform", schedule="geometric", sigma_min=1e-5, sigma_max=25.0)
    # the model's t = 0 law is the data under sigma_bar(0) = 1e-5 of noise: compare with that
    truth = marginal_table("uniform", torch.tensor([1e-5]))[0, :N, :N].reshape(-1)
    bound = exact_bound(m, "uniform", 96)
    assert torch.allclose(bound, -truth.log(), atol=2e-4), (bound + truth.log()).abs().max()


def test_bound_with_exact_scores_is_minus_log_p_absorbing_cosine():
    m = method(graph="absorbing", schedule="cosine", eps=1e-7, time_conditioning=False)
    assert torch.allclose(exact_bound(m, "absorbing", 96), -JOINT.reshape(-1).log(), atol=1e-4)


def test_absorbing_sedd_equals_mdlm_per_token_loss():
    """sigma(t) DSE with s = p_theta / expm1(sigma_bar) == MDLM's w(t) (-log p_theta(x0))."""
    g = torch.Generator().manual_seed(0)
    V, B, Lx, mask = 12, 6, 10, 11
    logits = torch.randn(B, Lx, V, generator=g, dtype=torch.float64) * 2
    x0 = torch.randint(0, mask, (B, Lx), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    sedd = SEDD(SEDDConfig(time_conditioning=False), vocab_size=V, mask_id=mask, bos_id=0, pad_id=0)
    mdlm = MDLM(MDLMConfig(), vocab_size=V, mask_id=mask, bos_id=0, pad_id=0)
    zt = mdlm.corrupt(x0, t[:, None], g)
    sub = logits.clone()
    sub[..., mask] = float("-inf")
    normalised = torch.log_softmax(sub, -1) + math.log(V - 1)  # scores p / expm1 after the offset

    def as_model(out):
        return lambda z, **_: out

    ours = sedd.schedule.rate(t)[:, None] * sedd.position_dse(as_model(normalised), x0, zt, t[:, None])
    theirs = mdlm.token_loss(as_model(logits), x0, zt, t[:, None], dtype=torch.float64)
    assert (zt == mask).any() and (zt != mask).any()
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_score_entropy_is_zero_at_the_truth_and_positive_elsewhere():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    r[:, 0] = 0.0  # a neighbour the data cannot reach
    w = torch.rand(5, 7, generator=g, dtype=torch.float64)
    w[:, 1] = 0.0  # a neighbour with no rate: its score is ignored, even -inf
    log_s = r.log()
    log_s[:, 1] = float("-inf")
    assert torch.allclose(score_entropy(log_s, r, w), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    for _ in range(5):
        noisy = log_s + 0.3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
        noisy[:, 1] = float("-inf")
        assert (score_entropy(noisy, r, w) > 0).all()


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_graph_transitions_match_the_matrix_exponential(graph):
    m = method(graph=graph)
    sb = torch.tensor([0.01, 0.7, 3.0], dtype=torch.float64)
    for x in range(N):
        ours = m.graph.transition(torch.full((3,), x), sb)  # (3, 4)
        assert torch.allclose(ours, kernel(graph, sb)[:, :, x], atol=1e-12)
    draws = m.graph.corrupt(torch.zeros(20000, dtype=torch.long), torch.full((20000,), 0.7),
                            torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=VOCAB).double() / 20000
    assert torch.allclose(freq, kernel(graph, sb[1:2])[0, :, 0], atol=0.015)


def test_prior_kl_is_the_kl_to_the_base():
    sb = torch.tensor(2.0, dtype=torch.float64)
    uni = method(graph="uniform")
    p = kernel("uniform", sb[None])[0, :N, 1]
    assert torch.allclose(uni.graph.prior_kl(torch.tensor([1]), sb), (p * (p * N).log()).sum())
    absorb = method(graph="absorbing")
    # base (1 - a) MASK + a Uniform(tokens): KL = a log(n_tokens)
    assert torch.allclose(absorb.graph.prior_kl(torch.tensor([1]), sb), math.exp(-2.0) * torch.log(
        torch.tensor(3.0, dtype=torch.float64)))


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_monte_carlo_bound_is_unbiased_for_the_quadrature(graph):
    """nll_bound's stratified estimate, averaged over draws, matches the quadrature bound."""
    kw = dict(schedule="loglinear", eps=1e-7) if graph == "absorbing" \
        else dict(schedule="geometric", sigma_min=1e-5, sigma_max=25.0)
    m = method(graph=graph, time_conditioning=True, **kw)  # the exact model reads sigma_bar
    reference = exact_bound(m, graph, 96)
    reps = 400
    x0 = SEQS.repeat(reps, 1)
    model = exact_scores(graph, m.graph.n_tokens if graph == "absorbing" else N)
    out = m.nll_bound(model, x0, n_samples=2, generator=torch.Generator().manual_seed(0)).nll
    per_seq = out.view(reps, len(SEQS))
    mean, se = per_seq.mean(0), per_seq.std(0) / math.sqrt(reps)
    assert ((mean - reference).abs() < 4 * se + 1e-3).all(), (mean - reference) / se


def test_training_step_runs_and_config_is_checked():
    m = method(graph="uniform", schedule="geometric")
    model = Transformer(ModelConfig(vocab_size=VOCAB, max_len=8, dim=16, n_layers=1, n_heads=2,
                                    time_conditioning=True))
    x0 = torch.randint(0, N, (4, 8))
    out = m.loss(model, x0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="sedd.graph"):
        SEDDConfig(graph="nope")


# --------------------------------------------------------------------------- samplers

from ddlm.sampling.score import ScoreSampler  # noqa: E402


def exact_scores1(graph: str, n_tokens: int) -> ExactScores:
    """Exact scores of one position whose law is the first marginal of JOINT."""
    return ExactScores(graph, n_tokens, joint=JOINT.sum(1), n_symbols=N, length=1)


def sampler_method(graph):
    kw = dict(schedule="loglinear", eps=1e-6) if graph == "absorbing" \
        else dict(schedule="geometric", sigma_min=1e-5, sigma_max=25.0)
    return method(graph=graph, time_conditioning=True, **kw)


def total_variation(tokens: torch.Tensor, p: torch.Tensor) -> float:
    index = tokens[:, 0] * N + tokens[:, 1] if tokens.shape[1] == 2 else tokens[:, 0]
    freq = torch.bincount(index, minlength=p.numel()).double() / len(tokens)
    return 0.5 * (freq - p.reshape(-1)).abs().sum().item()


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_analytic_step_is_exact_for_one_position(graph):
    m = sampler_method(graph)
    model = exact_scores1(graph, m.graph.n_tokens if graph == "absorbing" else N)
    out = ScoreSampler(m, steps=2).generate(model, 40000, 1, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 3 and not (out.tokens == MASK).any()
    assert total_variation(out.tokens, JOINT.sum(1)) < 0.01


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_samplers_converge_to_the_joint_as_steps_grow(graph, predictor):
    m = sampler_method(graph)
    model = exact_scores(graph, m.graph.n_tokens if graph == "absorbing" else N)
    g = torch.Generator().manual_seed(0)
    tvs = [total_variation(ScoreSampler(m, steps=T, predictor=predictor).generate(
        model, 20000, L, generator=g).tokens, JOINT) for T in (1, 64)]
    product = JOINT.sum(1)[:, None] * JOINT.sum(0)[None, :]
    assert tvs[1] < 0.03 and tvs[0] > tvs[1] + 0.05, tvs
    if predictor == "analytic" and graph == "absorbing":  # one step unmasks both independently
        assert 0.5 * (JOINT - product).abs().sum().item() - tvs[0] < 0.03


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_prompt_and_template_positions_are_kept(graph):
    """Given tokens stay; under the absorbing graph (clean tokens are known to be clean) the rest
    follows the exact conditional. Uniform noise cannot mark a token as clean, so there the
    clamped prompt is SEDD's approximate conditioning and only its positions are checked."""
    m = sampler_method(graph)
    model = exact_scores(graph, m.graph.n_tokens if graph == "absorbing" else N)
    g = torch.Generator().manual_seed(0)
    out = ScoreSampler(m, steps=8).generate(model, 4000, 1, prompt=torch.tensor([2]), generator=g)
    assert (out.tokens[:, 0] == 2).all() and (out.tokens[:, 1] < N).all()
    if graph == "absorbing":
        cond = JOINT[2] / JOINT[2].sum()  # p(x2 | x1 = 2)
        freq = torch.bincount(out.tokens[:, 1], minlength=N).double() / 4000
        assert (freq - cond).abs().max() < 0.03
    out = ScoreSampler(m, steps=8).generate(model, 10, 0, template=torch.tensor([[MASK, 1]]), generator=g)
    assert (out.tokens[:, 1] == 1).all() and (out.tokens[:, 0] < N).all()


def test_registered_method_trains_evaluates_and_samples_past_the_context(tmp_path):
    from ddlm.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    out = tmp_path / "run"
    tiny = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16",
            "--train.batch_size=4", "--train.eval_every=0", "--train.dtype=fp32"]
    for graph in ("absorbing", "uniform"):
        assert main(["train", "--method", "sedd", "--data", str(corpus), "--out", str(out / graph),
                     "--steps", "3", "--json", f"--sedd.graph={graph}", *tiny]) == 0
        assert main(["eval", str(out / graph), "--json", "--eval.max_batches=2"]) == 0
        jsonl = tmp_path / f"{graph}.jsonl"
        assert main(["sample", str(out / graph), "--num", "2", "--length", "40", "--steps", "4",
                     "--prompt", "the", "--out", str(jsonl), "--json"]) == 0
        rows = [json.loads(r) for r in jsonl.read_text().splitlines()]
        assert [len(r["tokens"]) for r in rows] == [43, 43] and all(r["text"].startswith("the") for r in rows)


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_float32_training_loss_matches_float64(graph):
    m = sampler_method(graph)
    model = Transformer(ModelConfig(vocab_size=VOCAB, max_len=8, dim=16, n_layers=1, n_heads=2,
                                    time_conditioning=True))
    x0 = torch.randint(0, N, (16, 8), generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.01, 0.99, 16, dtype=torch.float64)
    low, high = (m.sampled_nll(model, x0, t[:, None], torch.Generator().manual_seed(1), dtype=d)
                 for d in (torch.float32, torch.float64))
    assert low.dtype == torch.float32 and torch.allclose(low.double(), high, rtol=1e-4, atol=1e-5)
