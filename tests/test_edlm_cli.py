"""EDLM through `ddlm.cli.main`: train / sample / eval round trips with tiny models on a small text
corpus, and one clear line (exit status 2) for every misuse of the `--edlm.*` options.

Runs (module fixture, a few optimizer steps each):
  M   mdlm                      A   ar (same char tokenizer)        B   ar on the byte tokenizer
  M2  mdlm, another seed (another denoiser than M's)
  N   `train --method edlm --edlm.energy nce --init M`, with no model or data option repeated
"""
import json
import math

import pytest

from ddlm.cli import main

SEQ_LEN = 16
TEXT = "the quick brown fox jumps over the lazy dog\n" * 300
MODEL_DATA = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", f"--data.seq_len={SEQ_LEN}"]
TRAIN = ["--train.batch_size=4", "--train.dtype=fp32", "--train.eval_every=0", "--train.threads=1",
         "--train.progress=false"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def ok_json(args, capsys) -> dict:
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def error_line(args, capsys) -> str:
    """The single stderr line of a command that must fail with status 2 (no traceback)."""
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddlm: error: "), (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edlm_cli")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_CACHE", str(tmp / "cache"))
        paths = {name: tmp / name for name in ("M", "M2", "A", "B", "N")}
        for name, extra in (("M", ["--method", "mdlm"]), ("M2", ["--method", "mdlm", "--train.seed=1"]),
                            ("A", ["--method", "ar"]), ("B", ["--method", "ar", "--tokenizer", "byte"])):
            assert main(["train", *extra, "--data", str(corpus), "--out", str(paths[name]), "--steps", "3",
                         "--json", *MODEL_DATA, *TRAIN]) == 0
        # the model and data options are inherited from the --init checkpoint, not repeated
        assert main(["train", "--method", "edlm", "--edlm.energy", "nce", "--init", str(paths["M"]),
                     "--out", str(paths["N"]), "--steps", "3", "--json", *TRAIN]) == 0
        yield {name: str(path) for name, path in paths.items()}


def sample_args(path: str) -> list[str]:
    return ["sample", path, "--num", "3", "--steps", "8", "--seed", "0"]


def test_nce_training_inherits_model_and_data_from_init(runs, capsys):
    info_m = ok_json(["info", runs["M"]], capsys)
    info_n = ok_json(["info", runs["N"]], capsys)
    assert info_n["method"] == "edlm" and info_n["step"] == 3
    assert info_n["config"]["model"] == info_m["config"]["model"]
    assert info_n["config"]["data"] == info_m["config"]["data"]
    assert info_n["config"]["edlm"]["energy"] == "nce"


def test_sample_the_nce_run_and_mdlm_with_ar_and_nce_energies(runs, capsys):
    mask = "_"  # the char tokenizer renders MASK as "_"
    result = ok_json(sample_args(runs["N"]), capsys)
    assert result["method"] == "edlm" and result["sampler"] == "ImportanceSampler"
    assert len(result["texts"]) == 3 and result["lengths"]["min"] == SEQ_LEN
    assert not any(mask in t for t in result["texts"])

    ar = ok_json([*sample_args(runs["M"]), "--edlm.energy", "ar:" + runs["A"], "--edlm.k", "4",
                  "--edlm.window", "0.2"], capsys)
    assert ar["method"] == "edlm" and ar["sampler"] == "ImportanceSampler" and ar["nfe"] > 0
    nce = ok_json([*sample_args(runs["M"]), "--edlm.energy", "nce:" + runs["N"]], capsys)
    assert nce["method"] == "edlm" and len(nce["texts"]) == 3
    assert not any(mask in t for t in ar["texts"] + nce["texts"])


def test_nfe_counts_the_energy_passes(runs, capsys):
    energy = ["--edlm.energy", "ar:" + runs["A"], "--edlm.window", "1"]
    plain = ok_json([*sample_args(runs["M"]), "--no-cache"], capsys)
    one = ok_json([*sample_args(runs["M"]), "--no-cache", *energy, "--edlm.k", "1"], capsys)
    four = ok_json([*sample_args(runs["M"]), "--no-cache", *energy, "--edlm.k", "4"], capsys)
    # k = 1 is MDLM's sampler: the same draws, no energy pass
    assert one["texts"] == plain["texts"] and one["nfe"] == plain["nfe"] > 0
    assert four["nfe"] > one["nfe"]  # k proposals' energy passes are counted


def test_eval_the_nce_run_and_mdlm_with_an_ar_energy(runs, capsys):
    def evaluate(path, *extra):
        result = ok_json(["eval", path, "--eval.max_batches=2", *extra], capsys)
        assert result["method"] == "edlm" and result["tokens"] > 0
        assert math.isfinite(result["bpc"]) and result["bpc"] > 0
        return result

    own = evaluate(runs["N"])
    assert "NELBO" in own["protocol"] and "NOT a bound" not in own["protocol"]
    energy = ["--edlm.energy", "ar:" + runs["A"]]
    sir = evaluate(runs["M"], *energy)
    assert "NELBO" in sir["protocol"] and "k=4" in sir["protocol"] and "NOT a bound" not in sir["protocol"]
    evaluate(runs["M"], *energy, "--edlm.carry_over=true")


def test_edlm_misuse_is_one_clear_line(runs, tmp_path, capsys):
    M, A, B, N, M2 = runs["M"], runs["A"], runs["B"], runs["N"], runs["M2"]
    sample = ["sample", M, "--num", "1", "--steps", "2"]
    line = error_line([*sample, "--edlm.energy", "ar:" + M], capsys)
    assert "not an AR run" in line and "'mdlm'" in line
    line = error_line([*sample, "--edlm.energy", "nce:" + A], capsys)
    assert "not an EDLM run with an NCE energy" in line
    line = error_line([*sample, "--edlm.energy", "ar:" + B], capsys)
    assert "tokenizer" in line
    line = error_line(["sample", A, "--num", "1", "--edlm.k", "2"], capsys)
    assert "--edlm.*" in line and "'ar'" in line
    line = error_line(["eval", A, "--edlm.energy", "ar:" + A], capsys)
    assert "--edlm.*" in line and "'ar'" in line
    line = error_line([*sample, "--edlm.energy", "ar:" + A, "--edlm.k", "0"], capsys)
    assert "edlm.k=0" in line
    line = error_line([*sample, "--edlm.energy", "ar:" + A, "--edlm.window", "2"], capsys)
    assert "edlm.window" in line and "[0, 1]" in line
    line = error_line(["eval", M, "--edlm.energy", "ar:" + A, "--edlm.bound=joint"], capsys)
    assert "edlm.bound=joint" in line and "not a bound" in line
    line = error_line(["sample", M2, "--num", "1", "--steps", "2", "--edlm.energy", "nce:" + N], capsys)
    assert "another MDLM denoiser" in line
    line = error_line([*sample, "--foo.bar=1"], capsys)
    assert "--foo.bar" in line
    line = error_line(["train", "--method", "edlm", "--edlm.energy", "ar:" + A, "--init", M,
                       "--out", str(tmp_path / "E"), "--steps", "1", *TRAIN], capsys)
    assert "edlm.energy" in line and "nce" in line
    line = error_line([*sample, "--edlm.energy", "gpt:" + A], capsys)
    assert "edlm.energy" in line


def test_edlm_requests_that_would_silently_do_nothing_useful_are_refused(runs, tmp_path, capsys):
    """No energy named for an MDLM run (the untrained zero energy would cost k passes per step for
    plain MDLM), an empty energy path, an AR energy with a shorter context than the denoiser, EDLM
    trained without --init (a random frozen denoiser), and --init from a run of another method."""
    M, N = runs["M"], runs["N"]
    sample = ["sample", M, "--num", "1", "--steps", "2"]
    line = error_line([*sample, "--edlm.k", "8"], capsys)
    assert "no energy" in line and "ar:" in line
    line = error_line(["eval", M, "--edlm.energy", "nce", "--eval.max_batches=1"], capsys)
    assert "no energy" in line
    line = error_line([*sample, "--edlm.energy", "ar:"], capsys)
    assert "ar:DIR" in line
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    short = tmp_path / "A8"
    assert main(["train", "--method", "ar", "--data", str(corpus), "--out", str(short), "--steps", "1", "--json",
                 "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=8", *TRAIN]) == 0
    capsys.readouterr()
    line = error_line([*sample, "--edlm.energy", f"ar:{short}"], capsys)
    assert "context of 8" in line and "16" in line
    line = error_line(["train", "--method", "edlm", "--data", str(corpus), "--out", str(tmp_path / "E0"),
                       "--steps", "1", *MODEL_DATA, *TRAIN], capsys)
    assert "--init" in line
    line = error_line(["train", "--method", "mdlm", "--init", N, "--out", str(tmp_path / "E1"), "--steps", "1",
                       *TRAIN], capsys)
    assert "'edlm' run" in line and "'mdlm' model" in line
    line = error_line(["sample", N, "--num", "1", "--edlm.negatives", "3"], capsys)
    assert "--edlm.negatives" in line and "fixed by training" in line
    line = error_line([*sample, "--mdlm.schedule=cosine"], capsys)
    assert "--mdlm.schedule" in line and "fixed by training" in line
