"""Review of issue 26: one test per deliberate break of the math that the rest of the suite let
through. Each test fails on the broken code and passes on the correct code; every reference below
is written from the definition (a paper's equation, a docstring's claim), not from the code.

  1. EDLM's importance weights are self-normalised per row (over that row's own k proposals),
     never over the batch: the bound's rho_k estimate with two rows whose energy sums differ, and
     the sampler's per-row resampling law with rows whose energies differ by a row offset.
  2. The NCE loss with nu > 1 negatives per positive carries the log nu offset of NCE with noise
     ratio nu (Gutmann & Hyvarinen 2010; EDLM's -log sigma(-E+) - log sigma(E-) is nu = 1).
  3. MAUVE features are the judge's last state after its start token and the text cut to the
     judge's context (ddlm/eval/mauve.py), with a judge whose state reads the first token.
  4. BD3's sliding window keeps the newest context - stride clean tokens rounded down to whole
     blocks (ddlm/sampling/block.py), and sampling past the context equals sampling each block
     given only those kept tokens as a prompt.
  5. EDLM's temperature tau and top-p target p_phi^(1/tau) on the kept set S (ddlm/methods/edlm.py):
     checked exactly on the enumerable joint of conftest, for an energy that reads the proposal's
     log-probability (AR-like) and one that does not (NCE-like), and through the sampler's step.
  6. edlm.bound=joint is refused in one line (it is not a bound; tests/test_edlm.py (e)).
"""
import itertools
import math

import pytest
import torch

from ddlm.config import SampleConfig
from ddlm.errors import ConfigError
from ddlm.eval.judges import Judge
from ddlm.eval.mauve import featurize
from ddlm.methods.bd3 import BD3, BD3Config
from ddlm.methods.edlm import EDLM, EDLMConfig

from conftest import JOINT, MASK, PLACE, SEQS, L, V, ExactDenoiser, ExactEDLM, ExactEnergy, tiny_transformer


def edlm(**kw) -> EDLM:
    return EDLM(EDLMConfig(**kw), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0, context=L)


def index_of(x: torch.Tensor) -> torch.Tensor:
    """(N,) the row of SEQS that each row of x (N, L) is."""
    return (x * PLACE).sum(1)


class TableEnergy:
    """An energy that does not read the proposal (as the NCE energy): E(x_0, z) = table[x_0] +
    offset * (first token of z, 0 when masked). The offset is a function of z alone: it cancels
    in each row's self-normalised weights but makes the rows' energy sums differ. `seen` keeps
    (x_0, z) of each call."""

    def __init__(self, seed: int = 0, offset: float = 0.0) -> None:
        self.table = torch.randn(V ** L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.offset, self.seen = offset, []

    def __call__(self, x0, zt, sigma=None, *, log_q=None):
        self.seen.append((x0.clone(), zt.clone()))
        first = torch.where(zt[:, 0] == MASK, 0, zt[:, 0]).double()
        return self.table[index_of(x0)] + self.offset * first


# -------------------------------------------------------------- 1. per-row self-normalisation

def test_bound_rho_estimate_normalises_each_rows_weights_over_its_own_proposals():
    """One masked position per row and a one-hot proposal q (token c there), so the k proposals
    are fixed: x^1 = x (the data's token at l), x^2..x^k = x with c at l, and rho_k is exactly
    k w(x) / (w(x) + (k - 1) w(x_c)), w = exp(-E). Two rows whose energy sums differ by orders of
    magnitude: the estimate is each row's own |M| * -log rho_k, as for each row alone."""
    k, c = 3, 0
    x0 = torch.tensor([[1, 2, 1], [2, 1, 0]])
    zt = torch.tensor([[1, MASK, 1], [2, MASK, 0]])
    logp = torch.where(torch.nn.functional.one_hot(x0, V + 1).bool(), 0.0, -math.inf).double()  # carry-over
    logp[:, 1] = -math.inf
    logp[:, 1, c] = 0.0  # the masked position: always token c
    energy = TableEnergy(seed=3, offset=7.0)  # offsets +7 (row 0) and +14 (row 1): e^7 apart
    model = ExactEDLM(ExactDenoiser(JOINT), energy)
    method = edlm(k=k, bound_draws=2)
    masked = zt == MASK
    t = torch.full((2,), 0.7, dtype=torch.float64)

    def expected(row: int) -> float:
        x, xc = x0[row].clone(), x0[row].clone()
        xc[1] = c
        e = energy.table[index_of(torch.stack([x, xc]))] + energy.offset * float(zt[row, 0])
        w, wc = torch.exp(-e[0]), torch.exp(-e[1])
        return -math.log(float(k * w / (w + (k - 1) * wc)))

    got = method.sir_correction(model, x0, masked, zt, t, logp, torch.Generator().manual_seed(0))
    assert torch.allclose(got, torch.tensor([expected(0), expected(1)], dtype=torch.float64), atol=1e-12)
    assert abs(expected(0) - expected(1)) > 0.1  # the two rows' answers differ
    for row in (0, 1):
        alone = method.sir_correction(model, x0[row:row + 1], masked[row:row + 1], zt[row:row + 1], t[:1],
                                      logp[row:row + 1], torch.Generator().manual_seed(1))
        assert abs(float(alone) - expected(row)) < 1e-12


def sir_law(log_w: torch.Tensor, log_q: torch.Tensor, k: int) -> torch.Tensor:
    """(27,) the one-step law of k-proposal importance resampling, k q(x) E[w(x) / (w(x) + S)],
    S the sum of k - 1 i.i.d. w(y), y ~ q, by enumerating the other proposals (k <= 4)."""
    on = (log_q > -math.inf).nonzero().squeeze(1).tolist()
    w, q = log_w.exp(), log_q.exp()
    out = torch.zeros(V ** L, dtype=torch.float64)
    for others in itertools.product(on, repeat=k - 1):
        prob = math.prod(float(q[j]) for j in others)
        rest = sum(float(w[j]) for j in others)
        for i in on:
            out[i] += k * q[i] * prob * w[i] / (w[i] + rest)
    return out


def exact_proposal(z: tuple, logp_row: torch.Tensor) -> torch.Tensor:
    """(27,) log q(x | z) of the (possibly filtered) factorised proposal logp_row (L, V + 1)."""
    zt = torch.tensor(z)
    compatible = ((zt == MASK) | (SEQS == zt)).all(1)
    token = logp_row[torch.arange(L), SEQS].double()  # (27, L)
    log_q = torch.where(zt == MASK, token, torch.zeros_like(token)).sum(1)
    return torch.where(compatible, log_q, torch.tensor(-math.inf, dtype=torch.float64))


def law(tokens: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(index_of(tokens), minlength=V ** L).double()
    return counts / counts.sum()


def tv(p, r) -> float:
    return 0.5 * float((p - r).abs().sum())


def tv_noise(p: torch.Tensor, n: int) -> float:
    return 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


def test_importance_step_draws_each_rows_own_sir_law_when_row_energies_differ():
    """Rows alternating two prompts, an energy with a large per-prompt offset (the rows' energy
    sums differ by e^20, nothing about each row's own weights changes): each row's one-step law is
    the SIR law of its own z with weights exp(-table), within sampling noise. Drawing a row's x_0*
    from weights normalised over the batch (one index for several rows) fails this."""
    k, n = 3, 6000
    firsts = torch.tensor([0, 2]).repeat(n)
    zt = torch.full((len(firsts), L), MASK)
    zt[:, 0] = firsts
    energy = TableEnergy(seed=5, offset=10.0)
    model = ExactEDLM(ExactDenoiser(JOINT), energy)
    sampler = edlm(k=k).sampler(SampleConfig(steps=1, sampler="importance"))
    logp = sampler.denoiser(model, zt, 1.0)
    out = sampler.step(model, zt, 1.0, 0.0, logp, torch.Generator().manual_seed(2))
    assert torch.equal(out[:, 0], firsts)
    for a, row in ((0, 0), (2, 1)):
        z = (a, MASK, MASK)
        log_q = exact_proposal(z, logp[row])
        log_w = torch.where(log_q > -math.inf, -energy.table, torch.tensor(-math.inf, dtype=torch.float64))
        target = sir_law(log_w, log_q, k)
        assert abs(float(target.sum()) - 1) < 1e-12
        assert tv(law(out[firsts == a]), target) < 3 * tv_noise(target, n) + 0.005, a


# ------------------------------------------------------------------ 2. NCE with nu negatives

def nce_reference(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """(B,) binary NCE with noise ratio nu = e_neg.shape[1] (Gutmann & Hyvarinen 2010), model
    density p_theta exp(-E) against noise p_theta: G(u) = log p_m(u) - log(nu p_n(u)) = -E - log nu,
    h = sigmoid(G), loss = -log h(x+) - sum_j log(1 - h(x-_j))."""
    nu = e_neg.shape[1]
    h_pos = torch.sigmoid(-e_pos - math.log(nu))
    h_neg = torch.sigmoid(-e_neg - math.log(nu))
    return -torch.log(h_pos) - torch.log(1 - h_neg).sum(1)


@pytest.mark.parametrize("nu", [1, 3, 8])
def test_nce_loss_with_several_negatives_is_nce_with_noise_ratio_nu(nu):
    """EDLM.loss with edlm.negatives = nu against the hand-written NCE objective on the energies
    of the positive and of the negatives it drew: per sequence, and the batch loss (the mean per
    sequence over L). The negatives are nu draws per row from the denoiser given that row's x_t
    (they agree with its unmasked tokens) and are scored against that row's x_t."""
    B = 6
    x0 = SEQS[torch.tensor([0, 5, 13, 21, 26, 8])]
    energy = TableEnergy(seed=1)
    energy.table = 2.0 * energy.table  # energies of order a few nats: log nu matters
    model = ExactEDLM(ExactDenoiser(JOINT), energy)
    method = edlm(energy="nce", negatives=nu)
    t = torch.tensor([0.9, 0.6, 0.8, 1.0, 0.7, 0.95])
    out = method.loss(model, x0, t=t, generator=torch.Generator().manual_seed(4))
    (pos_x, zt), (neg_x, neg_z) = energy.seen
    assert torch.equal(pos_x, x0) and (zt == MASK).any()
    assert neg_x.shape == (B * nu, L) and torch.equal(neg_z, zt.repeat_interleave(nu, 0))
    assert ((neg_z == MASK) | (neg_x == neg_z)).all()
    e_pos = energy.table[index_of(pos_x)]
    e_neg = energy.table[index_of(neg_x)].view(B, nu)
    reference = nce_reference(e_pos, e_neg)
    per_seq = out.token_nll.double().sum(1)
    assert torch.allclose(per_seq, reference, rtol=1e-5, atol=1e-5), (per_seq, reference)
    assert abs(float(out.loss) - float(reference.mean()) / L) < 1e-5
    if nu > 1:  # without the log nu offset the objective is another one
        plain = -torch.log(torch.sigmoid(-e_pos)) - torch.log(torch.sigmoid(e_neg)).sum(1)
        assert (plain - reference).abs().max() > 0.1


# --------------------------------------------------------------------------- 3. MAUVE features

class FirstTokenJudge(Judge):
    """A tiny judge whose last hidden state is one-hot(first id) ++ one-hot(last id) ++ [length]:
    its features read the start token. Ids: 0 = start, 1..7 = characters."""

    name, context, start_id, end_id = "first-token", 6, 0, 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(ch) % 7 for ch in text]

    def last_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape[0] == 1 and 1 <= ids.shape[1] <= self.context, ids.shape
        row = ids[0]
        return torch.cat([torch.nn.functional.one_hot(row[0], 8).float(),
                          torch.nn.functional.one_hot(row[-1], 8).float(),
                          torch.tensor([float(len(row))])])


def test_mauve_features_are_the_judges_state_after_its_start_token():
    """featurize == the judge's last state of [start] + the text's first context - 1 ids, for short
    and over-long texts; every feature's first token is the start token."""
    judge = FirstTokenJudge()
    texts = ["a", "pride", "and prejudice, a novel", "emma"]
    features = featurize(judge, texts)
    expected = torch.stack([judge.last_hidden(torch.tensor([[judge.start_id] + judge.encode(t)[:judge.context - 1]]))
                            for t in texts]).numpy()
    assert features.shape == expected.shape and (features == expected).all()
    assert (features[:, judge.start_id] == 1).all()  # the first token seen is the start token
    assert features[2, -1] == judge.context  # the long text is cut to the judge's context


# ------------------------------------------------------------------ 4. BD3's sliding window

VOCAB, MASK_ID, EOS = 11, 10, 9


def bd3(block_size: int, context: int) -> BD3:
    return BD3(BD3Config(block_size=block_size), vocab_size=VOCAB, mask_id=MASK_ID, bos_id=EOS,
               pad_id=0, context=context)


def kept_by_definition(context: int, block: int, stride: int) -> int:
    """The newest context - stride clean tokens (stride 0: context // 2), rounded down to whole
    blocks (docs/methods.md §6.1.6)."""
    stride = stride or context // 2
    return (context - stride) // block * block


@pytest.mark.parametrize("context, block, stride, kept", [
    (16, 4, 0, 8), (16, 4, 4, 12), (16, 4, 6, 8), (16, 4, 13, 0), (16, 4, 16, 0), (12, 4, 1, 8),
    (32, 8, 10, 16), (16, 16, 0, 0), (8, 1, 3, 5), (24, 8, 7, 16)])
def test_window_keeps_context_minus_stride_rounded_down_to_whole_blocks(context, block, stride, kept):
    sampler = bd3(block, context).sampler(SampleConfig(stride=stride))
    assert kept == kept_by_definition(context, block, stride)  # the table is the definition
    assert sampler.kept_tokens(context) == kept
    assert kept + block <= context  # after a slide the next block fits


def sampling_backbone(max_len: int):
    model = tiny_transformer(vocab=VOCAB, max_len=max_len, seed=0, n_layers=2)
    with torch.no_grad():  # logits of order 1: samples vary and a changed input changes them
        model.head.weight.mul_(0.15)
        model.head.bias.mul_(0.15)
    return model


@pytest.mark.parametrize("stride", [0, 4, 6, 16])
def test_sampling_past_the_context_equals_each_block_given_only_the_kept_tokens(stride):
    """40 tokens with a 16-token model in blocks of 4: the sampler's output equals a loop that
    generates each block with the same generator given only the newest kept tokens as a prompt
    (the window moves when the next block would not fit, to keep kept_by_definition tokens), and
    no network call sees more than the context."""
    context, block, n, length = 16, 4, 3, 40
    model = sampling_backbone(context)
    method = bd3(block, context)
    sampler = method.sampler(SampleConfig(steps=3, cache=False, stride=stride))
    widths = []
    real_forward = model.forward

    def forward(tokens, *a, **kw):
        widths.append(tokens.shape[1])
        return real_forward(tokens, *a, **kw)

    model.forward = forward
    long = sampler.generate(model, n, length, generator=torch.Generator().manual_seed(7)).tokens
    assert long.shape == (n, length) and not (long == MASK_ID).any()
    assert max(widths) <= context

    keep = kept_by_definition(context, block, stride)
    generator = torch.Generator().manual_seed(7)
    seq, window, slides = long[:, :0], 0, 0
    for b0 in range(0, length, block):
        if b0 - window + block > context:
            window, slides = b0 - keep, slides + 1
        prompt = seq[:, window:b0]
        out = sampler.generate(model, n, block, prompt=prompt if prompt.shape[1] else None, generator=generator)
        seq = torch.cat([seq, out.tokens[:, -block:]], dim=1)
    assert slides >= 2
    assert torch.equal(long, seq)


# -------------------------------------------------------- 5. EDLM's temperature and top-p

def filtered_proposal(method, model, z: tuple, temperature: float, top_p: float):
    """The importance sampler's proposal for z: logp (1, L, V + 1) and its log q over SEQS."""
    sampler = method.sampler(SampleConfig(steps=1, sampler="importance", temperature=temperature, top_p=top_p))
    zt = torch.tensor([z])
    logp = sampler.denoiser(model, zt, 1.0)
    return sampler, zt, logp, exact_proposal(z, logp[0])


def target_on_kept_set(log_unnormalised: torch.Tensor, log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """(27,) p^(1/tau) restricted to the kept set S (where the filtered proposal is positive)."""
    on = log_q > -math.inf
    scaled = torch.where(on, log_unnormalised / temperature, torch.tensor(-math.inf, dtype=torch.float64))
    return torch.softmax(scaled, 0)


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (2.0, 1.0), (0.7, 0.95), (1.0, 0.8), (1.5, 0.8)])
@pytest.mark.parametrize("z", [(MASK, MASK, MASK), (MASK, 1, MASK)], ids=["all-masked", "middle-given"])
def test_temperature_and_top_p_target_the_tempered_residual_ebm_on_the_kept_set(z, temperature, top_p):
    """Every sequence of S as one row's proposals: q * exp(log weights), normalised, is the target
    p_phi^(1/tau) on S, exactly. AR-like energy (reads the proposal's log-probability; p_phi =
    JOINT): target JOINT^(1/tau) on S. NCE-like energy (a table; p_phi = p_theta exp(-E), p_theta the
    exact unfiltered denoiser): target (p_theta exp(-E))^(1/tau) on S."""
    method = edlm(k=4)
    for energy in (ExactEnergy(JOINT), TableEnergy(seed=2)):
        model = ExactEDLM(ExactDenoiser(JOINT), energy)
        _, zt, logp, log_q = filtered_proposal(method, model, z, temperature, top_p)
        on = log_q > -math.inf
        assert int(on.sum()) >= 2
        props = SEQS[on][None]  # (1, |S|, L)
        log_w = method.proposal_log_weights(model, props, zt, torch.ones(1, dtype=torch.float64), logp,
                                            temperature=temperature)[0]
        drawn = torch.zeros(V ** L, dtype=torch.float64)
        drawn[on] = torch.softmax(log_w + log_q[on], 0)
        if isinstance(energy, ExactEnergy):
            target = target_on_kept_set(JOINT.log(), log_q, temperature)
        else:
            log_p_theta = ExactEnergy(JOINT).log_q(SEQS, torch.tensor(z).expand(V ** L, L))
            target = target_on_kept_set(log_p_theta - energy.table, log_q, temperature)
        assert torch.allclose(drawn, target, atol=1e-10), (type(energy).__name__, drawn, target)


def test_importance_step_at_temperature_and_top_p_draws_the_sir_law_of_that_target():
    """One step t = 1 -> 0 from the fully masked z, tau = 0.5, top-p 0.95 (S: 12 of the 27
    sequences), k = 3, the exact (AR-like) energy: the draws follow the SIR law with proposal q (the
    filtered denoiser) and weights JOINT^(1/tau) / q on S, not the law whose weights ignore tau
    (JOINT / q)."""
    k, n, tau, top_p = 3, 20000, 0.5, 0.95
    z = (MASK,) * L
    method = edlm(k=k)
    model = ExactEDLM(ExactDenoiser(JOINT), ExactEnergy(JOINT))
    sampler, _, logp, log_q = filtered_proposal(method, model, z, tau, top_p)
    on = log_q > -math.inf
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    target = sir_law(torch.where(on, JOINT.log() / tau - log_q, neg_inf), log_q, k)
    ignoring_tau = sir_law(torch.where(on, JOINT.log() - log_q, neg_inf), log_q, k)
    assert tv(target, ignoring_tau) > 0.1 and int(on.sum()) == 12
    zt = torch.tensor([z]).expand(n, L).clone()
    out = sampler.step(model, zt, 1.0, 0.0, logp.expand(n, -1, -1), torch.Generator().manual_seed(6))
    drawn = law(out)
    assert float(drawn[~on].sum()) == 0  # top-p's cut holds
    assert tv(drawn, target) < 3 * tv_noise(target, n)
    assert tv(drawn, ignoring_tau) > tv(drawn, target) + 0.03


# ------------------------------------------------------------------------ 6. edlm.bound=joint

def test_the_joint_plug_in_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        edlm(bound="joint")
    text = str(err.value)
    assert "edlm.bound=joint" in text and "not a bound" in text and "sir" in text and "\n" not in text
    assert "upper bound" in edlm(bound="sir").bound_name
