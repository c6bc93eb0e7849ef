"""The lm-eval-harness model `ddlm` (ddlm/interop/lm_eval.py) on tiny runs of every method.

  - lm-eval's own simple_evaluate runs offline on a multiple-choice task defined here (a YAML task
    over a local JSONL file), for every method, with the Monte-Carlo summary on the object;
  - AR's loglikelihood is the exact conditional log-probability, computed here from the logits;
  - loglikelihood_rolling is `ddlm eval`'s figure on the same text;
  - MDLM's Monte-Carlo standard error shrinks as 1/sqrt(K);
  - generate_until stops at the stop sequence.
"""
import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from ddlm.cli import main  # noqa: E402
from ddlm.interop.lm_eval import DdlmLM  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog\n" * 200
TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
        "--train.batch_size=8", "--train.eval_every=0", "--train.dtype=fp32", "--tokenizer", "char"]
QUESTIONS = [
    {"question": "the quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
    {"question": "jumps over the", "choices": [" lazy", " quick", " red"], "answer": 0},
    {"question": "the lazy", "choices": [" dog", " fox", " owl"], "answer": 0},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_CACHE", str(tmp / "cache"))
        out = {}
        for method, extra in (("ar", []), ("mdlm", []), ("sedd", []), ("bd3", ["--bd3.block_size=4"])):
            out[method] = str(tmp / method)
            assert main(["train", "--method", method, "--data", str(corpus), "--out", out[method],
                         "--steps", "20", "--json", *TINY, *extra]) == 0
        out["edlm"] = str(tmp / "edlm")  # an NCE energy on the frozen MDLM run
        assert main(["train", "--method", "edlm", "--init", out["mdlm"], "--out", out["edlm"], "--steps", "3",
                     "--json", "--edlm.energy=nce", "--edlm.bound_draws=2", "--train.batch_size=8",
                     "--train.eval_every=0", "--train.dtype=fp32"]) == 0
        yield out, corpus


def request(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A task directory for lm-eval (YAML + JSONL), and no network for Hugging Face datasets."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(f"""task: ddlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return tmp_path / "tasks"


@pytest.mark.parametrize("method", ["ar", "mdlm", "sedd", "bd3", "edlm"])
def test_simple_evaluate_runs_offline(runs, offline, method):
    from lm_eval.tasks import TaskManager

    paths, _ = runs
    log = offline.parent / "mc.jsonl"
    results = lm_eval.simple_evaluate(model="ddlm", model_args=f"pretrained={paths[method]},mc_samples=4,mc_log={log}",
                                      tasks=["ddlm_tiny_mc"], task_manager=TaskManager(include_path=str(offline)),
                                      log_samples=False)
    acc = results["results"]["ddlm_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 9 and {r["samples"] for r in records} == {1 if method == "ar" else 4}
    assert all((r["stderr"] == 0.0) == (method == "ar") and r["logprob"] < 0 for r in records)


def test_cli_main_prints_the_table_and_the_bound_summary(runs, offline, capsys):
    from ddlm.interop.lm_eval import cli_main

    paths, _ = runs
    assert cli_main(paths["mdlm"], "ddlm_tiny_mc", 4, ["--include_path", str(offline), "--limit", "2"], True) == 0
    out = json.loads(capsys.readouterr().out)
    assert "ddlm_tiny_mc" in out["results"] and out["ddlm"]["loglikelihood_requests"] == 6
    assert out["ddlm"]["mc_samples"] == 4 and out["ddlm"]["mean_mc_stderr"] > 0
    assert cli_main(paths["ar"], "ddlm_tiny_mc", 4, ["--include_path", str(offline), "--limit", "1"], False) == 0
    table = capsys.readouterr().out
    assert "ddlm_tiny_mc" in table and "exact log p" in table


def test_ar_loglikelihood_is_the_exact_conditional_log_probability(runs):
    paths, _ = runs
    lm = DdlmLM(pretrained=paths["ar"], batch_size=4)
    pairs = [("the quick brown", " fox"), ("over the", " lazy dog"), ("", "the fox"), ("x" * 40, " the lazy")]
    got = lm.loglikelihood([request("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = lm.tok.encode(context.rstrip()) if context.strip() else []
        cont = lm.tok.encode(context + continuation)[len(ctx):]
        tokens = torch.tensor([(ctx + cont)[-32:]])
        with torch.no_grad():
            logits = lm.method.logits(lm.model, lm.method.shifted_input(tokens)).double()
        logp = torch.log_softmax(logits, -1)[0].gather(-1, tokens[0][:, None]).squeeze(-1)
        n = len(cont)
        assert math.isclose(logprob, float(logp[-n:].sum()), rel_tol=1e-5, abs_tol=1e-5)
        assert greedy == bool((logits[0, -n:].argmax(-1) == tokens[0, -n:]).all())


@pytest.mark.parametrize("method", ["ar", "mdlm", "sedd", "bd3", "edlm"])
def test_rolling_is_the_ddlm_eval_figure(runs, method, monkeypatch):
    from ddlm.data import build_tokenizer, encode_documents, load_corpus
    from ddlm.commands.evaluate import evaluate_checkpoint

    paths, corpus = runs
    monkeypatch.setenv("DDLM_CACHE", str(corpus.parent / "cache"))
    K = 3
    figure = evaluate_checkpoint(paths[method], data=str(corpus), split="test", overrides=[f"--eval.t_samples={K}"])
    tok = build_tokenizer("char")
    stream = encode_documents(tok, load_corpus(corpus).test)
    ids = [int(i) for i in stream[:figure["sequences"] * 32]]
    assert tok.bos_id not in ids and len(ids) == figure["tokens"]
    lm = DdlmLM(pretrained=paths[method], mc_samples=K)
    (value,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (tok.decode(ids),))])
    assert math.isclose(-value, figure["nll_per_token"] * figure["tokens"], rel_tol=1e-12)
    # a remainder past the whole windows is scored given the window before it, each token once
    (longer,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (tok.decode(ids) + "the fox",))])
    assert longer < value


def test_mdlm_monte_carlo_error_shrinks_with_samples(runs):
    paths, _ = runs
    pair = ("the quick brown fox jumps", " over the lazy dog")
    results = {}
    for K in (4, 64):
        lm = DdlmLM(pretrained=paths["mdlm"], mc_samples=K, batch_size=64, seed=1)
        (logprob, _), = lm.loglikelihood([request("loglikelihood", pair)])
        results[K] = (logprob, lm.records[-1]["stderr"])
        assert lm.records[-1]["samples"] == K and logprob < 0
    (few, se_few), (many, se_many) = results[4], results[64]
    assert 0 < se_many < se_few / 2  # 1/sqrt(K): a factor of 4 expected
    assert abs(few - many) < 4 * math.hypot(se_few, se_many)


@pytest.mark.parametrize("method", ["ar", "mdlm", "sedd", "bd3", "edlm"])
def test_generate_until_stops_at_the_stop_sequence(runs, method):
    paths, _ = runs
    lm = DdlmLM(pretrained=paths[method], steps=8, seed=0)
    free = lm.generate_until([request("generate_until", ("the quick", {"until": [], "max_gen_toks": 12}))])[0]
    assert 0 < len(free) <= 12
    stop = next((c for c in free[1:] if c != " "), None) or free[-1]
    lm.generator.manual_seed(0)
    cut = lm.generate_until([request("generate_until", ("the quick", {"until": [stop], "max_gen_toks": 12}))])[0]
    assert cut == free[:free.index(stop)] and stop not in cut


def test_ddlm_lm_eval_command(runs, offline, capsys):
    paths, _ = runs
    assert main(["lm-eval", paths["ar"], "--tasks", "ddlm_tiny_mc", "--mc-samples", "2", "--json",
                 "--include_path", str(offline), "--limit", "1"]) == 0
    assert "ddlm_tiny_mc" in json.loads(capsys.readouterr().out)["results"]
    assert main(["lm-eval", paths["ar"], "--tasks", "ddlm_tiny_mc", "--mc-samples", "0"]) == 2
    assert "--mc-samples 0" in capsys.readouterr().err
