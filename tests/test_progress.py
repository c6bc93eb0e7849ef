"""Progress bars write a line every few seconds, not every step, when stderr is not a terminal."""
from ddlm.cli import main

TEXT = "the quick brown fox jumps over the lazy dog\n" * 300
TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16",
        "--train.batch_size=4", "--train.dtype=fp32", "--train.eval_every=0", "--train.threads=1"]


def test_training_bar_is_quiet_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    assert main(["train", "--method", "ar", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--steps", "120", *TINY]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "train ar" in line]
    assert lines and "120/120" in lines[-1]
    assert len(lines) <= 6, len(lines)  # a step takes milliseconds here: one line per step is 120
