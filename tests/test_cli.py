"""CLI: help on every command, JSON output, and one clear line for every kind of bad input."""
import json
import subprocess
import sys

import pytest

from ddlm.cli import COMMANDS, main

TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
        "--train.batch_size=4", "--train.eval_every=0", "--train.dtype=fp32"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--method", "ar", "--out", str(out), "--steps", "3", "--json", *TINY]) == 0
    return out


def test_module_help_runs():
    proc = subprocess.run([sys.executable, "-m", "ddlm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_train_eval_sample_info_json(trained, tmp_path, capsys):
    code, out, _ = run_cli(["eval", str(trained), "--split", "test", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["exact"] and result["tokens"] > 0 and result["bpc"] > 0
    jsonl = tmp_path / "s.jsonl"
    code, out, _ = run_cli(["sample", str(trained), "--num", "3", "--length", "10", "--prompt", "the",
                            "--json", "--out", str(jsonl)], capsys)
    result = json.loads(out)
    assert code == 0 and len(result["texts"]) == 3 and all(t.startswith("the") for t in result["texts"])
    assert len(jsonl.read_text().splitlines()) == 3
    long = tmp_path / "long.jsonl"  # 70 tokens, past the context of 32
    code, out, _ = run_cli(["sample", str(trained), "--num", "2", "--length", "70", "--json",
                            "--out", str(long)], capsys)
    assert code == 0 and [len(json.loads(r)["tokens"]) for r in long.read_text().splitlines()] == [70, 70]
    code, out, _ = run_cli(["info", str(trained), "--json"], capsys)
    assert code == 0 and json.loads(out)["method"] == "ar"


def _error(args, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddlm: error: "), err
    return lines[0]


def test_bad_training_input(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    assert "unknown method 'nope'" in _error(["train", "--method", "nope", *out], capsys)
    assert "unknown tokenizer" in _error(["train", "--tokenizer", "wordpiece", *out], capsys)
    assert "not found" in _error(["train", "--data", str(tmp_path / "missing.txt"), *out], capsys)
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert "empty" in _error(["train", "--data", str(tmp_path / "empty.txt"), *out], capsys)
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 10)
    assert "not a text file" in _error(["train", "--data", str(tmp_path / "bin.txt"), *out], capsys)
    assert "train.lr" in _error(["train", *out, "--train.lr=-1"], capsys)
    assert "did you mean --model.dim" in _error(["train", *out, "--model.dimm=3"], capsys)
    assert "not an integer" in _error(["train", *out, "--model.dim=big"], capsys)


def test_bad_sampling_and_checkpoint_input(trained, tmp_path, capsys):
    assert "longer than the model's context" in _error(
        ["sample", str(trained), "--prompt", "word " * 20], capsys)
    assert "outside" in _error(["sample", str(trained), "--prompt", "caf\u00e9 \u65e5\u672c"], capsys)
    assert "sample.stride=40" in _error(["sample", str(trained), "--length", "50",
                                         "--sample.stride=40"], capsys)
    assert "holds no checkpoint" in _error(["eval", str(tmp_path)], capsys)
    assert "different run" in _error(["train", "--out", str(trained), "--steps", "3",
                                      *TINY, "--model.dim=64"], capsys)


def test_checkpoint_of_another_vocab(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    latest = copy / (copy / "latest").read_text().strip()
    from ddlm.data import ByteTokenizer

    (latest / "tokenizer.json").write_text(json.dumps(ByteTokenizer().to_dict()))
    assert "tokenizer.json' has" in _error(["eval", str(copy)], capsys)  # the manifest notices first
    from ddlm.checkpoint import write_manifest

    write_manifest(latest)  # a self-consistent checkpoint whose tokenizer is another vocabulary's
    assert "vocab" in _error(["eval", str(copy)], capsys)


def test_quickstart_runs_both_methods_end_to_end(tmp_path, capsys):
    tiny = [a.lstrip("-") for a in TINY if not a.startswith("--data.seq_len")] + ["sample.steps=8"]
    code, out, _ = run_cli(["quickstart", "--out", str(tmp_path), "--steps", "2", "--json",
                            *[f"--{a}" for a in tiny]], capsys)
    report = json.loads(out)
    assert code == 0 and set(report) == {"ar", "mdlm"}
    assert report["ar"]["exact"] and not report["mdlm"]["exact"]
    assert all(r["steps"] == 2 and r["test_bpc"] > 0 and len(r["samples"]) == 16 for r in report.values())
    assert all(0 <= r["known_words"] <= 1 and r["held_out_known_words"] > 0.9 for r in report.values())
    assert out.count("--- sample") == 0  # --json prints the report only


def test_method_without_likelihood_and_unhonoured_sampling_options(trained, capsys, monkeypatch):
    """eval of a method with no bound is one line; a sampler refuses what it cannot honour."""
    from ddlm.methods.ar import AR

    monkeypatch.setattr(AR, "has_likelihood", False)
    assert "no likelihood for method 'ar'" in _error(["eval", str(trained)], capsys)
    monkeypatch.undo()
    assert "unknown ar sampler 'first_hitting'" in _error(
        ["sample", str(trained), "--sampler", "first_hitting"], capsys)
