"""`ddlm compare`: a tiny recipe (two methods, a few steps) runs end to end, its report holds both
rows, and a rerun reuses the trained runs and the finished evaluations."""
import json
from pathlib import Path

import pytest

from ddlm.cli import main
from ddlm.compare import runner
from ddlm.compare.recipe import parse_recipe
from ddlm.errors import ConfigError

TINY = """
name: tiny
description: two methods, a few steps
base:
  data: {seq_len: 16}
  model: {dim: 32, n_layers: 1, n_heads: 2}
  train: {steps: 4, batch_size: 4, eval_every: 2, eval_batches: 1, ckpt_every: 2, threads: 1, progress: false}
rows:
  - {name: ar, method: ar}
  - {name: mdlm, method: mdlm, note: "the diffusion row"}
evaluate:
  likelihood: {split: test, max_batches: 2}
  generation: {steps: [2, 8], top_p: [1.0, 0.9], num: 3, length: 16, batch_size: 2, judges: [ar]}
  conditional: {prompts: 6, prompt_tokens: 4, length: 8, steps: 4, judge: ar}
"""


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    return recipe, tmp_path / "out"


def test_tiny_recipe_runs_end_to_end_and_a_rerun_reuses_everything(tiny, monkeypatch, capsys):
    recipe, out = tiny
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["ar", "mdlm"]
    ar, mdlm = results["rows"]
    assert ar["seeds"][0]["likelihood"]["exact"] and not mdlm["seeds"][0]["likelihood"]["exact"]
    assert len(ar["seeds"][0]["generation"]) == 2  # AR has no steps: one setting per top-p
    assert [(g["steps"], g["top_p"]) for g in mdlm["seeds"][0]["generation"]] == [(2, 1.0), (2, 0.9), (8, 1.0), (8, 0.9)]
    assert mdlm["seeds"][0]["generation"][0]["nfe"] <= 2 and mdlm["seeds"][0]["generation"][2]["nfe"] > 2
    assert 0 < mdlm["seeds"][0]["conditional"]["mauve"] <= 1 and mdlm["seeds"][0]["conditional"]["prompts"] == 6
    judged = mdlm["seeds"][0]["generation"][0]["judges"]["ar"]
    assert judged["tokens"] > 0 and judged["gen_ppl"] > 1
    report = (out / "report.md").read_text()
    for needle in ("| ar |", "| mdlm |", "## Likelihood", "## Conditional generation",
                   "the diffusion row", "BPC ar < mdlm", "![bpc](bpc.png)"):
        assert needle in report, needle
    for plot in ("bpc", "quality_vs_nfe", "quality_vs_seconds", "entropy_vs_steps", "validation"):
        assert (out / f"{plot}.png").stat().st_size > 1000, plot
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (1 + 2 + 1) + 2  # likelihood, generation settings, conditional
    assert all({"config", "environment", "spec"} <= set(r) for r in records)
    assert records[0]["environment"]["torch"] and records[0]["config"]["model"]["dim"] == 32

    # A rerun trains nothing and evaluates nothing: the checkpoints and stage files stay as they are.
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")}
    stages = {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    for stage in ("likelihood", "generation", "conditional"):
        monkeypatch.setattr(runner.Comparison, stage, lambda self, s: pytest.fail(f"redid {s.label}"))
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")} == checkpoints
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == stages
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)


def test_an_interrupted_compare_redoes_only_the_missing_stage(tiny, monkeypatch):
    recipe, out = tiny
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    lost = sorted((out / "stages").glob("generation-mdlm-*.json"))[0]
    kept = json.loads(lost.read_text())["result"]
    lost.unlink()
    redone = []
    original = runner.Comparison.generation
    monkeypatch.setattr(runner.Comparison, "generation",
                        lambda self, s: redone.append(s.label) or original(self, s))
    monkeypatch.setattr(runner.Comparison, "likelihood", lambda self, s: pytest.fail("redid likelihood"))
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    assert len(redone) == 1 and redone[0].startswith("generation mdlm")
    again = json.loads(lost.read_text())["result"]
    assert again["judges"]["ar"]["nll"] == pytest.approx(kept["judges"]["ar"]["nll"])  # same seed, same draw


def test_a_changed_setting_is_evaluated_anew(tiny, monkeypatch):
    recipe, out = tiny
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    recipe.write_text(TINY.replace("num: 3", "num: 4"))
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(g["num"] == 4 for r in rows for g in r["seeds"][0]["generation"])


@pytest.mark.parametrize("change, message", [
    ({"rows": []}, "needs a list of rows"),
    ({"rows": [{"name": "x", "method": "nope"}]}, "unknown method 'nope'"),
    ({"rows": [{"name": "x"}]}, "needs one of method"),
    ({"rows": [{"name": "x", "method": "ar"}, {"name": "x", "method": "mdlm"}]}, "appears twice"),
    ({"rows": [{"name": "e", "sample_of": "missing"}]}, "not a trained row"),
    ({"rows": [{"name": "a", "method": "ar", "colour": 1}]}, "unknown key rows[0].colour"),
    ({"rows": [{"name": "a", "method": "ar"}], "evaluate": {"generation": {"judges": ["gpt9"]}}},
     "judge 'gpt9'"),
    ({"rows": [{"name": "a", "method": "ar"}], "evaluate": {"generation": {"num": "many"}}},
     "evaluate.generation.num='many' is not an integer"),
    ({"rows": [{"name": "a", "method": "ar"}], "evaluation": {}}, "unknown recipe key 'evaluation'"),
])
def test_bad_recipes_get_one_line(change, message):
    data = {"name": "bad", **change}
    with pytest.raises(ConfigError) as err:
        parse_recipe(data, "bad.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_compare_refuses_a_missing_recipe_and_a_file_as_out(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    (tmp_path / "file").write_text("x")
    assert main(["compare", str(recipe), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_row_may_sample_another_row_with_its_own_sampler(tmp_path, monkeypatch):
    """`sample: {sampler: ...}` on a sampled row: the same run drawn by another sampler, its NFE and
    quality beside the trained row's; a bad sampling option is one line before anything runs."""
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "s.yaml"
    recipe.write_text(TINY.replace('  - {name: mdlm, method: mdlm, note: "the diffusion row"}', '''  - {name: mdlm, method: mdlm}
  - {name: mdlm-fh, sample_of: mdlm, sample: {sampler: first_hitting}}''').replace("conditional: {prompts: 6", "conditional: {prompts: 0"))
    assert main(["compare", str(recipe), "--out", str(tmp_path / "out"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    fh, mdlm = rows["mdlm-fh"]["seeds"][0]["generation"], rows["mdlm"]["seeds"][0]["generation"]
    assert rows["mdlm-fh"]["method"] == "mdlm + sampler=first_hitting"
    assert [g["nfe"] for g in fh] == [16.0] * 4  # first hitting: one call per token, whatever T
    assert [g["nfe"] for g in mdlm][:2] != [16.0, 16.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("sampler: first_hitting", "sampler: first_hitting, top_p: 7"))
    assert main(["compare", str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2" / "runs").exists()


def test_options_added_later_at_their_default_keep_a_stage_identity():
    """A stage's fingerprint reads the run config without options added after stages were first
    cached, while they hold their default (so a new option does not redo finished evaluations);
    set to anything else they count."""
    from ddlm.config import make_config
    from ddlm.compare.runner import LATER_FIELDS, stage_config

    plain = stage_config(make_config(base={"method": "ar"}))
    assert all(name not in plain[section] for section, names in LATER_FIELDS.items() for name in names)
    assert "dim" in plain["model"] and "steps" in plain["sample"]
    changed = stage_config(make_config(base={"method": "ar", "model": {"positions": "learned"},
                                             "sample": {"sampler": "", "threshold": 0.5}}))
    assert changed["model"]["positions"] == "learned" and changed["sample"]["threshold"] == 0.5


def test_a_quiet_compare_reuses_the_stages_of_a_verbose_one():
    """Whether a run shows a progress bar (--json makes compare quiet) is not part of a stage's
    identity; what a run computes is."""
    from ddlm.compare.recipe import read_recipe
    from ddlm.compare.runner import Comparison

    recipe = read_recipe(Path(__file__).resolve().parent.parent / "recipes" / "austen-char.yaml")
    verbose, quiet = Comparison(recipe, "unused", quiet=False), Comparison(recipe, "unused", quiet=True)
    stages = [s for s in verbose.plan() if not verbose.source(s.row).init]  # (init rows read their init run)
    assert len(stages) > 20 and [verbose.fingerprint(s) for s in stages] == [quiet.fingerprint(s) for s in stages]
    stage = stages[0]
    assert quiet.run_config(stage.row, stage.seed).train.progress is False  # the run itself stays quiet
    before = verbose.fingerprint(stage)
    recipe.base["data"]["seq_len"] = 64
    assert verbose.fingerprint(stage) != before
