"""`seeds: N` in a comparison recipe: every trained row is trained N times (train.seed + k), each
seed evaluated and sampled; seed k starts from and refers to seed k of other rows; a row's samples
are judged by another seed of the judge row; and bad recipes get one line."""
import json

import pytest
import yaml

from ddlm.cli import main
from ddlm.compare.recipe import parse_recipe
from ddlm.compare.runner import Comparison
from ddlm.errors import ConfigError

RECIPE = {
    "name": "seeds", "seeds": 2,
    "base": {"data": {"seq_len": 16}, "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
             "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "ckpt_every": 2, "threads": 1,
                       "progress": False}},
    "rows": [{"name": "ar", "method": "ar"}, {"name": "mdlm", "method": "mdlm"},
             {"name": "edlm-ar", "sample_of": "mdlm", "sample_options": {"edlm.energy": "ar:@ar", "edlm.k": 2}}],
    "evaluate": {"likelihood": {"max_batches": 1, "batch_size": 4},
                 "generation": {"steps": [2], "num": 2, "length": 16, "batch_size": 2, "judges": ["ar"]}},
}


def recipe(**changes):
    data = json.loads(json.dumps(RECIPE))
    data.update(changes)
    return parse_recipe(data, "seeds.yaml")


def test_every_seed_of_every_row_is_planned_with_its_own_run_and_seed(tmp_path):
    comp = Comparison(recipe(), tmp_path)
    trains = [s for s in comp.plan() if s.kind == "train"]
    assert [(s.row.name, s.seed) for s in trains] == [("ar", 0), ("mdlm", 0), ("ar", 1), ("mdlm", 1)]
    assert [comp.run_config(s.row, s.seed).train.seed for s in trains] == [0, 0, 1, 1]
    assert comp.run_dir("mdlm", 1) == tmp_path / "runs" / "mdlm-seed1"
    evals = [(s.kind, s.row.name, s.seed) for s in comp.plan() if s.kind != "train"]
    assert ("generation", "edlm-ar", 1) in evals and ("likelihood", "edlm-ar", 0) in evals
    # Seed 1 of the EDLM row uses seed 1 of the AR row as its energy ...
    assert comp.resolve({"edlm.energy": "ar:@ar"}, 1) == {"edlm.energy": f"ar:{tmp_path / 'runs' / 'ar-seed1'}"}
    # ... and is judged by the other seed of the AR row, so no row is judged by a model it came from.
    assert [comp.judge_seed("ar", k) for k in (0, 1)] == [1, 0]
    for row in ("ar", "edlm-ar", "mdlm"):
        assert not any(comp.self_judged(comp.recipe.row(row), "ar", k) for k in (0, 1)), row


def test_with_one_seed_the_self_judged_rows_are_found(tmp_path):
    comp = Comparison(recipe(seeds=1), tmp_path)
    judged = {row.name: comp.self_judged(row, "ar") for row in comp.recipe.rows}
    assert judged == {"ar": True, "mdlm": False, "edlm-ar": True}


def test_a_row_started_from_another_needs_as_many_seeds():
    data = json.loads(json.dumps(RECIPE))
    data["rows"].append({"name": "nce", "method": "edlm", "init": "mdlm", "seeds": 3})
    with pytest.raises(ConfigError, match="has 3 seeds but starts from 'mdlm', which has 2"):
        parse_recipe(data, "x.yaml")


@pytest.mark.parametrize("change, message", [
    ({"seeds": 0}, "seeds=0 must be between 1"),
    ({"seeds": "three"}, "seeds='three' is not an integer"),
    ({"base": 5}, "base of recipe 'x.yaml' must be a mapping"),
    ({"evaluate": {"generation": {"judges": [123]}}}, r"judges\[0\] must be a string"),
    ({"evaluate": {"generation": {"steps": ["four"]}}}, r"steps\[0\]='four' is not an integer"),
    ({"evaluate": {"generation": {"steps": [[8]]}}}, r"steps\[0\] must be a single int"),
    ({"rows": [{"name": "a\0b", "method": "ar"}]}, "without NUL bytes"),
    ({"rows": [{"name": "ar-seed1", "method": "ar"}]}, "not ending in -seed<k>"),
    ({"description": "x" * 5000}, "at most 4000"),
])
def test_bad_recipes_get_one_line(change, message):
    data = json.loads(json.dumps(RECIPE))
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data, "x.yaml")


def test_recursive_and_exploding_yaml_aliases_are_refused(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")  # 9^9 values from ~700 bytes
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nname: bomb\nrows: [{name: ar, method: ar}]\n")
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: loop\nrows: &r [{name: ar, method: ar}, *r]\n")
    for bad in (bomb, loop):
        assert main(["compare", str(bad), "--out", str(tmp_path / "out")]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("values" in err or "refers to itself" in err), err
    assert not (tmp_path / "out").exists()
    # The recipe parser bounds what it walks, whoever loaded the mapping.
    data = json.loads(json.dumps(RECIPE))
    data["rows"][0]["options"] = loop_value = {}
    loop_value["self"] = loop_value
    with pytest.raises(ConfigError, match="too large, too deeply nested or recursive"):
        parse_recipe(data, "x.yaml")
    wide = json.loads(json.dumps(RECIPE))
    wide["rows"][0]["options"] = {"many": [[1] * 100] * 300}
    with pytest.raises(ConfigError, match="at most 20000 values"):
        parse_recipe(wide, "x.yaml")


def test_two_seeds_run_end_to_end_into_per_seed_runs_and_one_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    data = json.loads(json.dumps(RECIPE))
    data["rows"] = data["rows"][:2]
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["ar", "ar-seed1", "mdlm", "mdlm-seed1"]
    results = json.loads((out / "results.json").read_text())
    ar, mdlm = results["rows"]
    assert [r["seed"] for r in mdlm["seeds"]] == [0, 1]
    bpcs = [r["likelihood"]["bpc"] for r in mdlm["seeds"]]
    assert bpcs[0] != bpcs[1]  # two trainings, not one evaluated twice
    gen = mdlm["seeds"][1]["generation"][0]
    assert len(gen["samples"]) == 2 and len(gen["judges"]["ar"]["per_text"]["nll"]) == 2
    assert ar["seeds"][0]["generation"][0]["self_judged"] == []  # judged by AR seed 1
    assert results["provenance"]["commit"] is None or len(results["provenance"]["commit"]) == 40
    text = (out / "report.md").read_text()
    assert "| mdlm |" in text and "2 (" in text and "BPC ar < mdlm" in text


def test_a_damaged_stage_file_is_redone_not_a_traceback(tmp_path):
    from ddlm.compare.runner import read_stage

    cases = {"deep": "[" * 200_000 + "]" * 200_000, "list": "[1, 2]", "result-a-list": '{"result": [1]}',
             "not-utf8": b"\xff\xfe{", "torn": '{"result": {"bpc": 1'}
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert read_stage(path) is None, name
    good = tmp_path / "good.json"
    good.write_text('{"result": {"bpc": 1.5}}')
    assert read_stage(good) == {"bpc": 1.5}
