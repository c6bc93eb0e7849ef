"""`ddlm compare` under torchrun: 2 gloo processes of one thread each against one process.

A two-row recipe (AR and MDLM, 4 steps of a global batch of 8 in micro-batches of 4, so that one
and two processes split every step into the same micro-batches) run by
`python -m torch.distributed.run --nproc_per_node 2 -m ddlm compare` gives the likelihood figures
of a one-process `ddlm compare` (to 1e-6) and its trained weights; rank 0 alone prints and writes
(one report line on stdout, one record per stage in results.jsonl); rank 0's samples and
conditional evaluation are there; a rerun under torchrun reuses every stage.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ddlm.checkpoint import resolve_checkpoint
from ddlm.cli import main

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name: two-rows
description: AR and MDLM, a few steps, for 1 and 2 processes
base:
  data: {corpus: austen, tokenizer: char, seq_len: 32}
  model: {dim: 32, n_layers: 2, n_heads: 2}
  train: {steps: 4, batch_size: 8, micro_batch_size: 4, warmup_steps: 1, eval_every: 2, eval_batches: 2,
          ckpt_every: 0, threads: 1, progress: false, dtype: fp32}
rows:
  - {name: ar, method: ar}
  - {name: mdlm, method: mdlm}
evaluate:
  likelihood: {split: test, max_batches: 5, batch_size: 4}
  generation: {steps: [2], top_p: [1.0], num: 2, length: 16, batch_size: 2, judges: [ar]}
  conditional: {prompts: 4, prompt_tokens: 4, length: 8, steps: 2, judge: ar, batch_size: 4}
"""
FIGURES = ("nll_per_token", "bpc", "ppl", "bpc_stderr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache: Path) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DDLM_DEVICE": "cpu",
           "DDLM_CACHE": str(cache)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)
    return out


def torchrun_compare(recipe: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "ddlm", "compare", str(recipe), "--out", str(out)]
    done = subprocess.run(cmd, env=env(cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(run: Path) -> dict:
    return load_file(resolve_checkpoint(run) / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same recipe in one process (in this one) and in two (torchrun)."""
    tmp = tmp_path_factory.mktemp("compare-dist")
    recipe = tmp / "two-rows.yaml"
    recipe.write_text(RECIPE)
    cache = tmp / "cache"
    saved = {k: os.environ.get(k) for k in ("DDLM_CACHE", "DDLM_DEVICE")}
    os.environ.update(DDLM_CACHE=str(cache), DDLM_DEVICE="cpu")
    try:
        assert main(["compare", str(recipe), "--out", str(tmp / "one"), "--json"]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    done = torchrun_compare(recipe, tmp / "two", cache)
    return {"recipe": recipe, "cache": cache, "one": tmp / "one", "two": tmp / "two", "stdout": done.stdout}


def test_two_processes_give_the_one_process_likelihoods_and_weights(runs):
    one = json.loads((runs["one"] / "results.json").read_text())
    two = json.loads((runs["two"] / "results.json").read_text())
    assert two["processes"] == 2 and "processes" not in one
    for a, b in zip(one["rows"], two["rows"]):
        assert a["name"] == b["name"]
        assert a["seeds"][0]["likelihood"]["tokens"] == b["seeds"][0]["likelihood"]["tokens"] > 0
        assert a["seeds"][0]["likelihood"]["sequences"] == b["seeds"][0]["likelihood"]["sequences"] == 20
        for key in FIGURES:
            assert b["seeds"][0]["likelihood"][key] == pytest.approx(a["seeds"][0]["likelihood"][key], rel=1e-6, abs=1e-6), (a["name"], key)
        assert a["seeds"][0]["train"]["steps"] == b["seeds"][0]["train"]["steps"] == 4
        wa, wb = weights(runs["one"] / "runs" / a["name"]), weights(runs["two"] / "runs" / b["name"])
        assert set(wa) == set(wb)
        worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
        assert worst < 1e-5, (a["name"], worst)


def test_rank_zero_alone_samples_writes_and_prints(runs):
    two = json.loads((runs["two"] / "results.json").read_text())
    ar, mdlm = two["rows"]
    assert len(ar["seeds"][0]["generation"]) == 1 and len(mdlm["seeds"][0]["generation"]) == 1
    assert mdlm["seeds"][0]["generation"][0]["judges"]["ar"]["tokens"] > 0 and 0 < mdlm["seeds"][0]["conditional"]["mauve"] <= 1
    records = [json.loads(line) for line in (runs["two"] / "results.jsonl").read_text().splitlines()]
    kinds = sorted((r["kind"], r["row"]) for r in records)
    assert kinds == sorted([(k, row) for row in ("ar", "mdlm") for k in ("likelihood", "generation", "conditional")])
    assert len(list((runs["two"] / "stages").iterdir())) == 7  # and the held-out reference
    assert runs["stdout"].count("report: ") == 1  # rank 0 alone prints
    assert "torchrun --nproc_per_node 2 -m ddlm compare" in (runs["two"] / "report.md").read_text()
    metrics = (runs["two"] / "runs" / "mdlm" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "val_bpc" in m]) == 2  # validations at steps 2 and 4, logged once


def test_a_rerun_under_torchrun_reuses_every_stage(runs):
    stages = {p: p.stat().st_mtime_ns for p in (runs["two"] / "stages").iterdir()}
    lines = (runs["two"] / "results.jsonl").read_text()
    torchrun_compare(runs["recipe"], runs["two"], runs["cache"])
    assert {p: p.stat().st_mtime_ns for p in (runs["two"] / "stages").iterdir()} == stages
    assert (runs["two"] / "results.jsonl").read_text() == lines
