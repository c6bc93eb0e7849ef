"""Zero-shot evaluation as the papers report it (docs/zero-shot.md): the four detokenizers on strings
worked by hand from the public code's rules, the three window layouts on known token streams, an
evaluation of a tiny trained run on a small file whose token counts are worked out by hand, and a
compare recipe whose report gains the zero-shot table."""
import json
import math

import pytest
import torch
from test_defects import tiny

from ddlm.data.detokenizers import DETOKENIZERS, detokenizer_for, detokenizer_name, lambada, lm1b, ptb, wikitext
from ddlm.errors import ConfigError, DataError
from ddlm.eval.zero_shot import PROTOCOLS, read_documents, wrap_documents

# ---- detokenizers: (before, after), each worked from the rules of docs/zero-shot.md §1

WIKITEXT = [
    ("the 1 @,@ 000 @-@ year @.@ old", "the 1,000-year.old"),
    ("end . Next , then : so ; what ? yes ! ", "end. Next, then: so; what? yes! "),
    ("a ( b c ) [ d ] { e } \" f \" g", "a (b c) [d] {e} \"f\" g"),
    (" = = Heading = = \n", " == Heading ==\n"),
    (" = = = Sub = = = \n \n text", " === Sub ===\n\ntext"),
    ("at 5 ° C", "at 5°C"),
    ("the players ' union", "the players' union"),
    ("the dog 's bone", "the dog's bone"),
    (" N N N ", " 1 N 1 "),  # one pass only
    ("see /' 5/ here", "see /'[0-9]/ here"),  # the public code's quirk: a literal replacement
]
PTB = [
    ("the company 's shares", "the company's shares"),
    ("it does n't <unk>", "it doesn't ?"),
    ("investors ' money ", "investors' money "),
    ("fell N % to $ N \\/ share", "fell 1 % to $1 / share"),
    (" N N N ", " 1 1 1 "),  # repeated: every N of a run
    ("no # N bonds", "no #1 bonds"),
    ("a \n b", "a\nb"),
]
LM1B = [
    ("see http : / / www.x.com now", "see http://www.x.com now"),
    ("he said \" hello there \" and left .", "he said \"hello there\" and left."),
    ("is it ? yes , it is : really ; ok !", "is it? yes, it is: really; ok!"),
    ("the ( big ) [ red ] dog 's toy", "the (big) [red] dog's toy"),
    ("cost $ 5 or £ 3 / day", "cost $5 or £3/day"),
    ("ends here .", "ends here."),
]
LAMBADA = [
    ("  \u201cHi,\u201d she said.  ", "\n\"Hi,\" she said."),
    ("plain", "\nplain"),
]


@pytest.mark.parametrize("func, cases", [(wikitext, WIKITEXT), (ptb, PTB), (lm1b, LM1B), (lambada, LAMBADA)],
                         ids=["wikitext", "ptb", "lm1b", "lambada"])
def test_each_detokenizer_applies_the_papers_rules(func, cases):
    for before, after in cases:
        assert func(before) == after, before
    assert "kuleshov-group/mdlm dataloader.py" in " ".join((func.__doc__ or "").split())  # names its source


@pytest.mark.parametrize("spec, name", [
    ("ptb", "ptb"), ("wikitext2", "wikitext"), ("wikitext103", "wikitext"), ("lambada", "lambada"),
    ("lm1b", "lm1b"), ("hf:/data/wikitext-103-raw-v1", "wikitext"), ("hf:/data/ptb_text_only", "ptb"),
    ("/data/lambada_test.jsonl", "lambada"), ("/data/lm1b/test.txt", "lm1b"), ("hf:/data/owt", None),
    ("austen", None), ("/tmp/notes.txt", None),
])
def test_the_detokenizer_follows_the_corpus_name(spec, name):
    assert detokenizer_name(spec) == name
    assert detokenizer_for(spec) is (DETOKENIZERS[name] if name else None)


def test_an_explicit_detokenizer_overrides_the_name():
    assert detokenizer_name("hf:/data/ptb", "none") is None
    assert detokenizer_name("/tmp/notes.txt", "wikitext") == "wikitext"
    with pytest.raises(ConfigError, match="unknown detokenizer 'wiki'"):
        detokenizer_name("ptb", "wiki")


# ---- windows ---------------------------------------------------------------------------------
BOS, EOS = 90, 91
DOCS = [[1, 2, 3], [4, 5]]


def test_mdlm_windows_put_eos_after_each_document_and_bos_eos_around_each_window():
    w = wrap_documents(DOCS, 8, bos=BOS, eos=EOS, protocol=PROTOCOLS["mdlm"])
    # stream 1 2 3 EOS 4 5 EOS: one piece of L-2 = 6 tokens, one token dropped
    assert w.tokens.tolist() == [[BOS, 1, 2, 3, EOS, 4, 5, EOS]]
    assert w.counted.tolist() == [[False] + [True] * 7]
    assert (w.text_tokens, w.dropped) == (5, 1)


def test_sedd_windows_have_no_bos_and_count_every_token():
    w = wrap_documents(DOCS, 3, bos=BOS, eos=EOS, protocol=PROTOCOLS["sedd"])
    assert w.tokens.tolist() == [[1, 2, 3], [EOS, 4, 5]]
    assert w.counted.all() and (w.text_tokens, w.dropped) == (5, 1)


def test_bd3_windows_put_nothing_between_documents():
    w = wrap_documents(DOCS, 5, bos=BOS, eos=EOS, protocol=PROTOCOLS["bd3"])
    assert w.tokens.tolist() == [[BOS, 1, 2, 3, EOS]]
    assert w.counted.tolist() == [[False, True, True, True, True]] and (w.text_tokens, w.dropped) == (3, 2)


def test_grouped_wrapping_drops_each_groups_remainder_as_the_public_code_does():
    docs = [[1, 2], [3], [4, 5]]
    one = wrap_documents(docs, 5, bos=BOS, eos=EOS, protocol=PROTOCOLS["mdlm"])
    grouped = wrap_documents(docs, 5, bos=BOS, eos=EOS, protocol=PROTOCOLS["mdlm"], group_rows=2)
    assert one.tokens[:, 1:-1].tolist() == [[1, 2, EOS], [3, EOS, 4]]
    assert grouped.tokens[:, 1:-1].tolist() == [[1, 2, EOS], [4, 5, EOS]]  # 3 EOS lost with group 1


def test_too_few_tokens_for_a_window_is_one_line():
    with pytest.raises(DataError, match="no window of 32"):
        wrap_documents(DOCS, 32, bos=BOS, eos=EOS, protocol=PROTOCOLS["mdlm"])
    with pytest.raises(ConfigError, match="L >= 3"):
        wrap_documents(DOCS, 2, bos=BOS, eos=EOS, protocol=PROTOCOLS["bd3"])


def test_the_windows_bos_is_given_to_the_bound_clean_and_uncounted():
    from ddlm.eval.zero_shot import GivenFirst

    seen = {}

    class Recorder:
        name = "recorder"

        def nll_bound(self, model, x0, **kwargs):
            seen.update(kwargs)
            return "bound"

    wrapped = GivenFirst(Recorder())
    x0 = torch.zeros(2, 5, dtype=torch.long)
    assert wrapped.nll_bound(None, x0, n_samples=3, loss_mask=None) == "bound" and wrapped.name == "recorder"
    assert seen["given"].tolist() == [[True, False, False, False, False]] * 2 and seen["n_samples"] == 3


# ---- documents ---------------------------------------------------------------------------------
def test_documents_of_files_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    text = tmp_path / "ptb.txt"
    text.write_text("a b\n\nc\n")
    assert read_documents(str(text)) == (["a b\n", "\n", "c\n"], "every line")
    jsonl = tmp_path / "lambada_test.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_documents(str(jsonl))[0] == ["one", "two"]
    folder = tmp_path / "wikitext-2-raw-v1"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["v1", "", "v2"]}),
                          "test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(folder))
    assert read_documents(f"hf:{folder}") == (["v1", "", "v2"], "split 'validation'")
    assert read_documents(f"hf:{folder}", "test")[0] == ["x"]
    only = tmp_path / "lambada"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["p"]})}).save_to_disk(str(only))
    assert read_documents(f"hf:{only}") == (["p"], "split 'test' (its only split)")
    single = tmp_path / "ptb_rows"
    datasets.Dataset.from_dict({"sentence": ["s1", "s2"]}).save_to_disk(str(single))
    assert read_documents(f"hf:{single}") == (["s1", "s2"], "every row")


# ---- a tiny trained run -------------------------------------------------------------------------
LINE = "do n't stop\n"  # ptb: "don't stop\n"; char tokenizer: "don t stop " = 11 tokens


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ddlm.train.loop import train

    root = tmp_path_factory.mktemp("zs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_CACHE", str(root / "cache"))
        for method in ("ar", "mdlm"):
            train(tiny(method), root / method, quiet=True)  # L = 32, char tokenizer
    corpus = root / "ptb.valid.txt"
    corpus.write_text(LINE * 20)
    return root, corpus


def test_zero_shot_eval_counts_the_papers_tokens_and_scores_the_exact_ar_nll(runs, monkeypatch):
    from ddlm.build import load_for_inference
    from ddlm.commands.evaluate import evaluate_checkpoint

    root, corpus = runs
    monkeypatch.setenv("DDLM_CACHE", str(root / "cache"))
    out = evaluate_checkpoint(root / "ar", data=str(corpus), zero_shot=True)
    info = out["zero_shot"]
    # 20 documents of 11 tokens + EOS = 240 = 8 pieces of L-2 = 30; each window counts 31 tokens
    assert (info["detokenizer"], info["protocol"], info["documents"]) == ("ptb", "mdlm", 20)
    assert (info["windows"], info["dropped_tokens"], info["text_tokens"]) == (8, 0, 220)
    assert (out["tokens"], out["sequences"], info["characters"]) == (8 * 31, 8, 220)
    # the exact AR NLL of those windows, BOS given, computed here from the model directly
    loaded = load_for_inference(root / "ar")
    tok = loaded.tokenizer
    doc = tok.encode("don't stop\n") + [tok.eos_id]
    stream = torch.tensor(doc * 20).view(8, 30)
    x0 = torch.cat([torch.full((8, 1), tok.bos_id), stream, torch.full((8, 1), tok.eos_id)], 1)  # (8, 32)
    with torch.no_grad():
        nll = loaded.method.token_nll(loaded.model, x0)[:, 1:].double().sum()
    assert out["nll_per_token"] == pytest.approx(float(nll) / (8 * 31), rel=1e-5)
    assert out["bpc"] == pytest.approx(float(nll) / math.log(2) / 220, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["nll_per_token"]))
    assert out["ppl_stderr"] == pytest.approx(out["ppl"] * out["nll_stderr"]) and out["nll_stderr"] > 0
    assert out["exact"] and "zero-shot" in out["protocol"] and "BOS" in out["protocol"]

    plain = evaluate_checkpoint(root / "ar", data=str(corpus), zero_shot=True, detokenizer="none")
    assert plain["zero_shot"]["detokenizer"] is None and plain["zero_shot"]["stream_tokens"] == 20 * 13
    sedd = evaluate_checkpoint(root / "ar", data=str(corpus), zero_shot=True, zero_shot_protocol="sedd")
    assert sedd["tokens"] == 7 * 32 and sedd["zero_shot"]["dropped_tokens"] == 240 - 7 * 32


def test_zero_shot_eval_of_a_diffusion_run_is_a_bound_on_the_same_tokens(runs, monkeypatch):
    from ddlm.commands.evaluate import evaluate_checkpoint

    from ddlm.eval import zero_shot

    root, corpus = runs
    monkeypatch.setenv("DDLM_CACHE", str(root / "cache"))
    calls = []
    original = zero_shot.GivenFirst.nll_bound
    monkeypatch.setattr(zero_shot.GivenFirst, "nll_bound", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = evaluate_checkpoint(root / "mdlm", data=str(corpus), zero_shot=True, overrides=["--eval.t_samples=2"])
    assert not out["exact"] and out["tokens"] == 8 * 31 and out["t_samples"] == 2
    assert len(calls) == 1  # one batch of 8 windows, each with its BOS given
    assert math.isfinite(out["ppl"]) and out["bpc"] > 0
    with pytest.raises(ConfigError, match="needs --data"):
        evaluate_checkpoint(root / "mdlm", zero_shot=True)
    with pytest.raises(ConfigError, match="unknown zero-shot protocol"):
        evaluate_checkpoint(root / "mdlm", data=str(corpus), zero_shot=True, zero_shot_protocol="gpt2")


# ---- compare -------------------------------------------------------------------------------------
RECIPE = """
name: zs
base:
  data: {seq_len: 16}
  model: {dim: 32, n_layers: 1, n_heads: 2}
  train: {steps: 2, batch_size: 4, eval_every: 0, ckpt_every: 2, threads: 1, progress: false, dtype: fp32}
rows:
  - {name: ar, method: ar}
  - {name: mdlm, method: mdlm}
evaluate:
  likelihood: {split: test, max_batches: 1}
  generation: {steps: [], judges: []}
zero_shot:
  - {name: ptb, data: CORPUS}
  - {name: raw, data: CORPUS, detokenizer: none, protocol: sedd}
"""


def test_a_recipe_with_zero_shot_corpora_reports_their_table(tmp_path, monkeypatch):
    from ddlm.compare.recipe import parse_recipe
    from ddlm.compare.runner import compare

    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "ptb.valid.txt"
    corpus.write_text(LINE * 20)
    recipe = tmp_path / "zs.yaml"
    recipe.write_text(RECIPE.replace("CORPUS", str(corpus)))
    results = compare(recipe, tmp_path / "out", quiet=True)
    ar, mdlm = results["rows"]
    ptb_ar, raw_ar = ar["seeds"][0]["zero_shot"]["ptb"], ar["seeds"][0]["zero_shot"]["raw"]
    assert ptb_ar["zero_shot"]["detokenizer"] == "ptb" and raw_ar["zero_shot"]["detokenizer"] is None
    # L = 16: ptb 240 tokens = 17 windows of [BOS] + 14 + [EOS], of which max_batches 1 (16 rows)
    # are scored; raw (sedd, no detokenizer) 260 tokens = 16 windows of 16
    assert ptb_ar["zero_shot"]["windows"] == 17 and ptb_ar["tokens"] == 16 * 15 and raw_ar["tokens"] == 16 * 16
    assert not mdlm["seeds"][0]["zero_shot"]["ptb"]["exact"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Zero-shot likelihood" in report and "| row | kind | ptb PPL | ptb BPC | raw PPL | raw BPC |" in report
    line = next(x for x in report.splitlines() if x.startswith("| ar | exact |"))
    assert f"{ptb_ar['ppl']:,.2f} ± {ptb_ar['ppl_stderr']:,.2f}" in line and f"{ptb_ar['bpc']:.3f} ± " in line
    stages = [json.loads(p.read_text())["kind"] for p in (tmp_path / "out" / "stages").iterdir()]
    assert stages.count("zero_shot") == 4

    for bad, message in ((["x"], "zero_shot[0] must be a mapping"),
                         ([{"name": "a b", "data": "f"}], "plain name"),
                         ([{"name": "a", "data": "f", "protocol": "gpt"}], "protocol='gpt'"),
                         ([{"name": "a", "data": "f", "detokenizer": "wiki"}], "detokenizer='wiki'"),
                         ([{"name": "a"}], "data must name a corpus")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_recipe({"name": "r", "rows": [{"name": "ar", "method": "ar"}], "zero_shot": bad}, "r.yaml")


def test_the_command_line_zero_shot_flags(runs, monkeypatch, capsys):
    from ddlm.cli import main

    root, corpus = runs
    monkeypatch.setenv("DDLM_CACHE", str(root / "cache"))
    assert main(["eval", str(root / "ar"), "--zero-shot", "--data", str(corpus), "--protocol", "bd3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["zero_shot"]["protocol"] == "bd3" and out["zero_shot"]["detokenizer"] == "ptb"
    for args in (["--zero-shot"], ["--detokenizer", "ptb"], ["--zero-shot", "--data", str(corpus), "--protocol", "x"]):
        assert main(["eval", str(root / "ar"), *args]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
