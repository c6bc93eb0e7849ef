"""The shipped recipes and their scales.

  - every recipe in recipes/ parses: a comparison recipe at full size and at each of its scales, every
    trained row's run config validated (a train recipe through make_config)
  - text8, lm1b and owt state the papers' protocol (tokenizer, L, packing, global batch, rows) and
    their compute, and docs/recipes.md documents each
  - each recipe's `tiny` scale runs end to end through compare(...) on this CPU (the embedded Austen
    corpus; the recipe's tokenizer when it is available offline, else char, and the report says
    which), every row evaluated; lm1b also with a bert vocabulary given by DDLM_BERT_VOCAB
  - a scale a recipe lacks is a one-line error naming the scales it has; scale overrides merge key
    by key and may not change which rows exist
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ddlm.cli import main
from ddlm.compare.recipe import apply_scale, parse_recipe, read_recipe
from ddlm.compare.runner import Comparison, choose_tokenizer, compare
from ddlm.config import make_config
from ddlm.errors import ConfigError, DdlmError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SCALED = ["text8", "lm1b", "owt"]


def is_comparison(path: Path) -> bool:
    return "rows" in yaml.safe_load(path.read_text())


def gpt2_available() -> bool:
    from ddlm.data.tokenizers import build_tokenizer

    try:
        build_tokenizer("gpt2")
    except DdlmError:
        return False
    return True


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDLM_BERT_VOCAB", raising=False)
    return tmp_path


# ------------------------------------------------------------------------- every recipe parses

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path, tmp_path):
    if not is_comparison(path):  # a `ddlm train --config` recipe
        make_config(recipe=str(path))
        return
    recipe = read_recipe(path)
    Comparison(recipe, tmp_path).check()
    for scale in recipe.scales:
        scaled = read_recipe(path, scale=scale)
        assert [r.name for r in scaled.rows] == [r.name for r in recipe.rows]
        Comparison(scaled, tmp_path).check()


def test_the_paper_recipes_state_their_protocol_and_compute():
    docs = (ROOT / "docs" / "recipes.md").read_text()
    expect = {"text8": ("char", 256, "wrap", 256), "lm1b": ("bert", 128, "wrap", 512),
              "owt": ("gpt2", 1024, "wrap", 512)}
    for name, (tokenizer, seq_len, packing, batch) in expect.items():
        recipe = read_recipe(ROOT / "recipes" / f"{name}.yaml")
        data, train = recipe.base["data"], recipe.base["train"]
        assert (data["tokenizer"], data["seq_len"], data.get("packing", "wrap"), train["batch_size"]) == \
            (tokenizer, seq_len, packing, batch), name
        assert "tiny" in recipe.scales, name
        assert re.search(r"[\d,]+ GPU-hours", recipe.description), name  # the compute estimate
        assert "estimate" in recipe.description and f"recipes/{name}.yaml" in recipe.description
        assert f"recipes/{name}.yaml" in docs and "GPU-hours" in docs
    lm1b, owt = (read_recipe(ROOT / "recipes" / f"{n}.yaml") for n in ("lm1b", "owt"))
    assert lm1b.base["data"]["corpus"] == "prepared:data/lm1b" and owt.base["data"]["corpus"] == "prepared:data/owt"
    assert [r.name for r in lm1b.rows] == ["ar", "mdlm", "sedd", "bd3-4", "bd3-8", "bd3-16"]
    assert [r.name for r in owt.rows] == ["ar", "mdlm", "sedd", "bd3-4", "bd3-8", "bd3-16", "edlm-ar", "edlm-nce"]
    for recipe in (lm1b, owt):
        assert recipe.base["train"]["steps"] == 1_000_000
        for row in recipe.rows:
            if row.method == "bd3":
                assert row.init == "mdlm" and row.train["steps"] == 150_000
        assert recipe.generation.judges == ["ar"] and recipe.conditional.judge == "ar"
    assert owt.generation.steps == [128, 256, 512, 1024] and owt.generation.length == 1024
    assert owt.row("edlm-nce").init == "mdlm" and owt.row("edlm-ar").sample_of == "mdlm"
    padded = read_recipe(ROOT / "recipes" / "lm1b.yaml", scale="padded")
    assert padded.base["data"]["packing"] == "pad" and padded.base["data"]["seq_len"] == 128


# ------------------------------------------------------------------------------ scales themselves

BASE = {"name": "r", "base": {"data": {"corpus": "big", "seq_len": 512}, "train": {"steps": 100, "lr": 0.1}},
        "rows": [{"name": "ar", "method": "ar"},
                 {"name": "e", "method": "edlm", "init": "ar", "options": {"energy": "nce", "k": 4},
                  "train": {"steps": 50}}],
        "evaluate": {"generation": {"steps": [8, 32], "num": 16}}}


def test_a_scale_merges_its_overrides_key_by_key():
    data = {**BASE, "scales": {"small": {
        "description": "small", "tokenizer_fallback": "char",
        "base": {"data": {"seq_len": 32}, "model": {"dim": 16}},
        "rows": {"e": {"train": {"steps": 2}, "options": {"k": 2}}},
        "evaluate": {"generation": {"steps": [2]}, "likelihood": {"max_batches": 1}}}}}
    recipe = parse_recipe(data, "r.yaml", scale="small")
    assert recipe.base == {"data": {"corpus": "big", "seq_len": 32}, "train": {"steps": 100, "lr": 0.1},
                           "model": {"dim": 16}}
    e = recipe.row("e")
    assert e.train == {"steps": 2} and e.options == {"energy": "nce", "k": 2} and e.init == "ar"
    assert recipe.generation.steps == [2] and recipe.generation.num == 16 and recipe.likelihood.max_batches == 1
    assert recipe.scale == "small" and recipe.tokenizer_fallback == "char" and recipe.scales == ["small"]
    assert recipe.description.startswith("[small scale] small")
    unscaled = parse_recipe(data, "r.yaml")
    assert unscaled.base["data"]["seq_len"] == 512 and unscaled.row("e").options["k"] == 4
    assert data["base"]["data"]["seq_len"] == 512  # the recipe's own mapping is untouched


@pytest.mark.parametrize("scale, message", [
    ({"rows": {"nope": {"train": {"steps": 1}}}}, "names 'nope', which is not a row"),
    ({"rows": {"e": {"init": ""}}}, "may not change 'init'"),
    ({"rows": {"ar": {"method": "mdlm"}}}, "may not change 'method'"),
    ({"colour": 1}, "unknown key scales.s.colour"),
    ({"base": [1]}, "scales.s.base must be a mapping"),
])
def test_bad_scales_get_one_line(scale, message):
    with pytest.raises(ConfigError) as err:
        parse_recipe({**BASE, "scales": {"s": scale}}, "r.yaml", scale="s")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_scale_the_recipe_lacks_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"recipe 'austen-char' has no scale 'tiny'; its scales: none$"):
        read_recipe(ROOT / "recipes" / "austen-char.yaml", scale="tiny")
    with pytest.raises(ConfigError, match=r"recipe 'lm1b' has no scale 'huge'; its scales: padded, tiny$"):
        read_recipe(ROOT / "recipes" / "lm1b.yaml", scale="huge")
    out = tmp_path / "out"
    assert main(["compare", str(ROOT / "recipes" / "austen-char.yaml"), "--scale", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "ddlm: error: recipe 'austen-char' has no scale 'tiny'; its scales: none"
    assert not out.exists()


def test_an_unavailable_tokenizer_falls_back_at_a_scale_that_allows_it(cache, tmp_path):
    recipe = read_recipe(ROOT / "recipes" / "lm1b.yaml", scale="tiny")
    notes = choose_tokenizer(recipe)
    assert recipe.base["data"]["tokenizer"] == "char" and notes["tokenizer"] == "char"
    assert "in place of the recipe's bert" in notes["tokenizer_note"] and "DDLM_BERT_VOCAB" in notes["tokenizer_note"]
    full = read_recipe(ROOT / "recipes" / "lm1b.yaml")  # at full size there is no fallback: bert or an error
    assert choose_tokenizer(full) == {} and full.base["data"]["tokenizer"] == "bert"
    vocab = write_bert_vocab(tmp_path / "vocab.txt")
    recipe = read_recipe(ROOT / "recipes" / "lm1b.yaml", scale="tiny")
    recipe.base["data"]["tokenizer"] = f"bert:{vocab}"
    assert choose_tokenizer(recipe)["tokenizer"] == f"bert:{vocab}"


# --------------------------------------------------------------------------- tiny runs end to end

def write_bert_vocab(path: Path) -> Path:
    """A small uncased WordPiece vocabulary in bert-base-uncased's layout (specials first): the
    letters and digits, their ## forms, punctuation, and the 400 commonest words of Austen."""
    from ddlm.data.corpora import austen_text

    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list(".,;:!?'\"-()&*_[]/")
    words = Counter(re.findall(r"[a-z]+", austen_text()[:2_000_000].lower()))
    common = [w for w, _ in words.most_common(400) if len(w) > 1]
    path.write_text("\n".join(specials + chars + punct + ["##" + c for c in chars] + common) + "\n")
    return path


def run_tiny(name: str, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    results = compare(ROOT / "recipes" / f"{name}.yaml", out, quiet=True, scale="tiny")
    seconds = time.perf_counter() - start
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    written = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["seeds"][0]["likelihood"]["bpc"]) for r in written["rows"]] == \
        [(r["name"], r["seeds"][0]["likelihood"]["bpc"]) for r in results["rows"]]
    recipe = read_recipe(ROOT / "recipes" / f"{name}.yaml", scale="tiny")
    assert [r["name"] for r in results["rows"]] == [r.name for r in recipe.rows]
    for row in results["rows"]:
        assert row["seeds"][0]["likelihood"]["bpc"] > 0 and row["seeds"][0]["likelihood"]["tokens"] > 0, row["name"]
        assert row["seeds"][0]["generation"], row["name"]
        assert all(g["num"] == recipe.generation.num and g["judges"]["ar"]["tokens"] > 0
                   for g in row["seeds"][0]["generation"]), row["name"]
        assert 0 < row["seeds"][0]["conditional"]["mauve"] <= 1, row["name"]
        assert row["seeds"][0]["conditional"]["prompts"] == recipe.conditional.prompts, row["name"]
        if row["seeds"][0]["train"] is not None:  # tens of steps (a row started from another: a few more)
            assert 5 <= row["seeds"][0]["train"]["steps"] <= 20, row["name"]
        assert row["config"]["model"]["dim"] == 64 and row["config"]["data"]["corpus"] == "austen"
    report = (out / "report.md").read_text()
    assert f"# ddlm compare: {name} (tiny scale)" in report and "--scale tiny" in report
    assert f"At the tiny scale this run used {results['scale']['tokenizer_note']}." in report
    return results, seconds


def test_text8_tiny_runs_end_to_end(cache):
    results, seconds = run_tiny("text8", cache / "out")
    assert results["scale"]["tokenizer"] == "char" and "the recipe's tokenizer char" in results["scale"]["tokenizer_note"]
    print(f"text8 tiny: {seconds:.1f} s")


def test_lm1b_tiny_runs_end_to_end_on_characters_without_a_bert_vocabulary(cache):
    results, seconds = run_tiny("lm1b", cache / "out")
    assert results["scale"]["tokenizer"] == "char"
    assert all(r["config"]["data"]["tokenizer"] == "char" for r in results["rows"])
    print(f"lm1b tiny (char): {seconds:.1f} s")


@pytest.mark.slow
def test_lm1b_tiny_uses_bert_when_its_vocabulary_is_given(cache, monkeypatch):
    monkeypatch.setenv("DDLM_BERT_VOCAB", str(write_bert_vocab(cache / "vocab.txt")))
    results, seconds = run_tiny("lm1b", cache / "out")
    assert results["scale"]["tokenizer"] == "bert" and "available offline" in results["scale"]["tokenizer_note"]
    assert all(r["config"]["data"]["tokenizer"] == "bert" for r in results["rows"])
    print(f"lm1b tiny (bert): {seconds:.1f} s")


@pytest.mark.slow
def test_owt_tiny_runs_end_to_end(cache):
    results, seconds = run_tiny("owt", cache / "out")
    want = "gpt2" if gpt2_available() else "char"  # char only where GPT-2's ranks are not installed
    assert results["scale"]["tokenizer"] == want
    assert all(r["config"]["data"]["tokenizer"] == want for r in results["rows"])
    print(f"owt tiny ({want}): {seconds:.1f} s")
