"""Validation curves read from metrics.jsonl, and the plot written from them."""
import json

import pytest

from ddlm.errors import DataError
from ddlm.eval.plots import plot_validation_curves, validation_curve


def write_metrics(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_validation_curve_keeps_the_last_row_of_a_step(tmp_path):
    write_metrics(tmp_path / "run", [
        {"step": 10, "loss": 3.0},
        {"step": 20, "split": "valid", "val_bpc": 4.0, "val_bpc_stderr": 0.1},
        {"step": 10, "split": "valid", "val_bpc": 4.5, "val_bpc_stderr": 0.2},
        {"step": 20, "split": "valid", "val_bpc": 3.9, "val_bpc_stderr": 0.1},  # logged again on resume
    ])
    assert validation_curve(tmp_path / "run") == ([10, 20], [4.5, 3.9], [0.2, 0.1])


def test_missing_or_empty_metrics_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl"):
        validation_curve(tmp_path)
    write_metrics(tmp_path / "run", [{"step": 1, "loss": 2.0}])
    with pytest.raises(DataError, match="no validation rows"):
        validation_curve(tmp_path / "run")


def test_plot_is_a_png(tmp_path):
    write_metrics(tmp_path / "a", [{"step": s, "split": "valid", "val_bpc": 5 - s} for s in (1, 2, 3)])
    out = plot_validation_curves({"a": tmp_path / "a"}, tmp_path / "fig" / "c.png", reference={"u": 4.1})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_with_a_band_of_several_runs_is_a_png(tmp_path):
    out = plot_validation_curves({}, tmp_path / "b.png", bands={"mean ± sd": ([1, 2, 3], [4.0, 3.0, 2.5], [0.1, 0.2, 0.1])},
                                 points={"quoted": ([1, 3], [3.9, 2.4])})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
