"""The Method contract, checked for every registered method (ddlm.methods.base.method_names()).

A method joins these tests by registering; to join the likelihood check it also adds its exact model
to conftest.EXACT_MODELS. Models are built the way the trainer builds them: make_config ->
build_method -> complete_model_config -> method.build_model, on tiny configs.

  (a) the loss is finite and back-propagates a finite, non-zero gradient to every trainable
      parameter (none to frozen ones);
  (b) nll_bound with the method's exact model of conftest.JOINT is >= -log p(x) for every x, within
      4 standard errors over independent draws, tight for the built-in methods; AR's is exact;
  (c) sampling with a real tiny backbone never changes prompt or template positions, for every
      sampler of every method; samplers that cannot fill a template refuse it in one line;
  (d) `ddlm train -> eval -> sample` round-trips through ddlm.cli.main;
  (e) resume is bit-identical to an uninterrupted run, and really continues where it stopped.
"""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ddlm.checkpoint import load_trainer_state
from ddlm.cli import main
from ddlm.config import SampleConfig, make_config
from ddlm.data import build_tokenizer
from ddlm.errors import ConfigError
from ddlm.methods.base import method_class, method_names
from ddlm.train.loop import train

from conftest import EXACT_MODELS, JOINT, MASK, SEQS, V, kernel, tiny_built

METHODS = method_names()
SAMPLERS = [(name, sampler) for name in METHODS for sampler in method_class(name).samplers]
TINY_MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2}
SEQ_LEN = 16
TEXT = "the quick brown fox jumps over the lazy dog\n" * 300


def built(name: str, seed: int = 0, perturb: float = 0.0):
    """(run, tokenizer, method, model) of the contract's tiny model (conftest.tiny_built)."""
    return tiny_built(name, TINY_MODEL, SEQ_LEN, seed, perturb)


def text_ids(tokenizer, n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) random ids of ordinary text symbols (no BOS, MASK or PAD)."""
    specials = {tokenizer.bos_id, tokenizer.mask_id, tokenizer.pad_id}
    allowed = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in specials])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(0, len(allowed), (n, length), generator=g)]


def test_every_method_is_covered():
    assert {"ar", "mdlm", "sedd"} <= set(METHODS)
    for name in METHODS:
        cls = method_class(name)
        assert cls.name == name and cls.samplers, name


# ------------------------------------------------------------------------------ (a) gradients

@pytest.mark.parametrize("name", METHODS)
def test_loss_backpropagates_to_every_trainable_parameter(name):
    """The model as built: finite loss and finite gradients at init. Gated backbones zero their
    gates, modulation maps and head, so at init most gradients are exactly zero; after two AdamW
    steps (which move every parameter that had a gradient) every trainable tensor must receive a
    non-zero gradient. Frozen parameters (requires_grad=False) must receive none."""
    run, tokenizer, method, model = built(name)
    model.train()
    x0 = text_ids(tokenizer, 4, SEQ_LEN, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        out = method.loss(model, x0, generator=torch.Generator().manual_seed(step))
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), (step, out.loss)
        assert out.token_nll.shape == out.weights.shape == x0.shape
        assert torch.isclose(out.loss, out.token_nll.sum() / out.weights.sum())
        out.loss.backward()
        for pname, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), (step, pname)
            else:
                assert p.grad is None, pname
        if step < 2:
            optimizer.step()
    zero = [pname for pname, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    assert not zero, f"{name}: no gradient reaches {zero}"


# ------------------------------------------------------------------------------ (b) the bound

def bound_cases():
    """(method, options, id): every registered method with a likelihood, its noise floors set to
    1e-6 where it has them (the default eps = sampling_eps = 1e-3 makes the Monte-Carlo estimate
    dip up to 0.03 nats below -log p(x) for the rarest x of JOINT), plus SEDD's uniform graph."""
    cases = []
    for name in METHODS:
        cls = method_class(name)
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        options = {k: 1e-6 for k in ("eps", "sampling_eps") if k in fields}
        if "block_size" in fields:  # blocks must divide JOINT's length 3: L' = 1 here, L' = 3 below
            options["block_size"] = 1
        cases.append(pytest.param(name, options, id=name))
    cases.append(pytest.param("sedd", {"graph": "uniform", "schedule": "geometric", "sigma_min": 1e-5,
                                       "sampling_eps": 1e-6},
                              id="sedd-uniform"))
    if "bd3" in METHODS:
        cases.append(pytest.param("bd3", {"eps": 1e-6, "sampling_eps": 1e-6, "block_size": 3},
                                  id="bd3-block3"))
    return cases


TIGHT = {"ar", "mdlm", "sedd", "bd3", "edlm"}  # bound == -log p(x) (up to 1e-3 nats) with the exact model


def data_law(method) -> torch.Tensor:
    """(27,) the law over SEQS the exact model's process starts from: JOINT, or JOINT after the
    noise sigma_bar(0) > 0 of a geometric schedule (SEDD: K(sigma_bar(0)) per position)."""
    schedule = getattr(method, "schedule", None)
    if schedule is None or schedule.total_noise(torch.zeros((), dtype=torch.float64)) == 0:
        return JOINT
    assert hasattr(method, "graph"), "a method with sigma_bar(0) > 0 needs its t = 0 law here"
    K = kernel(method.cfg.graph, schedule.total_noise(torch.zeros(1, dtype=torch.float64)),
               method.vocab_size, method.mask_id)[0]  # (vocab, vocab)
    factor = K[SEQS[:, None, :], SEQS[None, :, :]].prod(-1)  # (27 x, 27 a): prod_j K(x_j | a_j)
    return factor @ JOINT


@pytest.mark.parametrize("name, options", bound_cases())
def test_bound_with_the_exact_model_is_at_least_the_exact_nll(name, options):
    cls = method_class(name)
    if not cls.has_likelihood:
        pytest.skip(f"{name} defines no likelihood")
    assert name in EXACT_MODELS, f"add an exact model of JOINT for method {name!r} to conftest.EXACT_MODELS"
    method = cls(cls.config_class(**options), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0,
                 context=SEQS.shape[1])
    model = EXACT_MODELS[name](method)
    truth = -data_law(method).log()  # (27,)
    x0 = SEQS
    first = method.nll_bound(model, x0, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert first.nll.dtype == torch.float64 and first.nll.shape == (len(x0),)
    assert torch.equal(first.tokens, torch.full((len(x0),), float(x0.shape[1]), dtype=torch.float64))
    if first.exact:
        assert torch.allclose(first.nll, truth, rtol=1e-5, atol=1e-5), (first.nll - truth)
        return
    # 20 calls x 40 copies of every x x 4 time samples. Copies within a call share the call's
    # stratified times (spread evenly), which only makes the spread across copies overstate the
    # standard error of their mean: the checks below are conservative.
    copies = 40
    draws = torch.cat([method.nll_bound(model, x0.repeat(copies, 1), n_samples=4,
                                        generator=torch.Generator().manual_seed(seed)).nll.view(copies, -1)
                       for seed in range(1, 21)])  # (800, 27)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert (mean >= truth - 4 * se).all(), ((mean - truth) / se)
    if name in TIGHT:  # and not vacuous: on average over x it is -log p(x)
        gap, gap_se = (mean - truth).mean(), se.pow(2).sum().sqrt() / len(se)
        assert gap.abs() <= 4 * gap_se + 1e-3, (gap, gap_se)


# --------------------------------------------------------------------------- (c) sampling

@pytest.mark.parametrize("name, sampler_name", SAMPLERS, ids=[f"{m}-{s}" for m, s in SAMPLERS])
def test_sampling_never_changes_prompt_or_template_positions(name, sampler_name):
    run, tokenizer, method, model = built(name, perturb=0.2)
    model.eval()
    sampler = method.sampler(SampleConfig(sampler=sampler_name, steps=4))
    prompt = text_ids(tokenizer, 1, 5, seed=1)[0]
    g = torch.Generator().manual_seed(0)
    out = sampler.generate(model, 3, 7, prompt=prompt, generator=g)
    assert out.tokens.shape == (3, 12) and out.nfe > 0
    assert torch.equal(out.tokens[:, :5], prompt.expand(3, 5))
    assert not (out.tokens == tokenizer.mask_id).any()
    assert ((out.tokens >= 0) & (out.tokens < tokenizer.vocab_size)).all()

    template = text_ids(tokenizer, 3, SEQ_LEN, seed=2)
    template[torch.rand(3, SEQ_LEN, generator=torch.Generator().manual_seed(3)) < 0.5] = tokenizer.mask_id
    given = template != tokenizer.mask_id
    if not sampler.takes_template:
        with pytest.raises(ConfigError) as err:
            sampler.generate(model, 3, 0, template=template, generator=g)
        assert "\n" not in str(err.value) and str(err.value)
        return
    out = sampler.generate(model, 3, 0, template=template, generator=g)
    assert out.tokens.shape == template.shape
    assert torch.equal(out.tokens[given], template[given])
    assert not (out.tokens == tokenizer.mask_id).any()


@pytest.mark.parametrize("name", METHODS)
def test_sampler_names_resolve_and_unknown_ones_are_one_line_errors(name):
    method = built(name)[2]
    cls = method_class(name)
    assert type(method.sampler(SampleConfig())) is type(method.sampler(SampleConfig(sampler=cls.samplers[0])))
    with pytest.raises(ConfigError) as err:
        method.sampler(SampleConfig(sampler="no-such-sampler"))
    assert "\n" not in str(err.value) and "no-such-sampler" in str(err.value)


# ------------------------------------------------------------------------------- (d) the CLI

TINY_ARGS = [f"--model.dim={TINY_MODEL['dim']}", f"--model.n_layers={TINY_MODEL['n_layers']}",
             f"--model.n_heads={TINY_MODEL['n_heads']}", f"--data.seq_len={SEQ_LEN}",
             "--train.batch_size=4", "--train.dtype=fp32", "--train.eval_every=0",
             "--train.threads=1"]


@pytest.mark.parametrize("name", METHODS)
def test_cli_train_eval_sample_round_trip(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    init = []
    if method_class(name).needs_init:  # EDLM trains an energy on a frozen MDLM run
        assert main(["train", "--method", "mdlm", "--data", str(corpus), "--out", str(tmp_path / "base"),
                     "--steps", "2", "--json", *TINY_ARGS]) == 0
        capsys.readouterr()
        init = ["--init", str(tmp_path / "base")]
    assert main(["train", "--method", name, "--data", str(corpus), "--out", str(out), "--steps", "3",
                 "--json", *TINY_ARGS, *init]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["step"] == 3 and not trained["interrupted"]

    code = main(["eval", str(out), "--json", "--eval.max_batches=2"])
    captured = capsys.readouterr()
    if method_class(name).has_likelihood:
        assert code == 0, captured.err
        result = json.loads(captured.out.strip().splitlines()[-1])
        assert result["method"] == name and result["tokens"] > 0
        assert math.isfinite(result["bpc"]) and result["bpc"] > 0
    else:
        assert code == 2 and len(captured.err.strip().splitlines()) == 1, captured.err

    samples = tmp_path / "samples.jsonl"
    assert main(["sample", str(out), "--num", "2", "--length", "8", "--steps", "4", "--prompt", "the",
                 "--out", str(samples), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == name and result["nfe"] > 0
    rows = [json.loads(r) for r in samples.read_text().splitlines()]
    assert len(rows) == 2
    mask_id = build_tokenizer("char").mask_id
    for row in rows:
        assert len(row["tokens"]) == 3 + 8 and row["text"].startswith("the")
        assert mask_id not in row["tokens"]


# ------------------------------------------------------------------------------ (e) resume

def same(a, b) -> bool:
    """Bit-for-bit equality of nested trainer states (tensors, containers, plain values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def losses_in(out_dir) -> list[float]:
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_identical_and_continues(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    def config(method: str, **train_options):
        return make_config(base={
            "method": method, "model": {**TINY_MODEL, "dropout": 0.1},
            "data": {"corpus": str(corpus), "seq_len": SEQ_LEN},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                      "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1, **train_options}})

    init = {}
    if method_class(name).needs_init:  # EDLM trains an energy on a frozen MDLM run
        init = {"init": str(train(config("mdlm", steps=2), tmp_path / "base", quiet=True).out_dir)}
    run = config(name, **init)
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=2, quiet=True)
    assert part.interrupted and part.step == 2 and part.losses == full.losses[:2]
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 2 and rest.step == 4 and len(rest.losses) == 2

    # the resumed run continued: its steps are the uninterrupted run's steps 3-4, not a fresh
    # run's steps 1-2 (the uninterrupted run is a fresh run with the same seed)
    assert rest.losses == full.losses[2:]
    assert rest.losses != full.losses[:2]
    assert losses_in(tmp_path / "full") == losses_in(tmp_path / "part") == full.losses

    a = load_file(full.checkpoint / "model.safetensors")
    b = load_file(rest.checkpoint / "model.safetensors")
    assert same(a, b)
    state_a, state_b = load_trainer_state(full.checkpoint), load_trainer_state(rest.checkpoint)
    assert state_a["step"] == 4 and same(state_a, state_b)
