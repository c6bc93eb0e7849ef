"""The GPU path, run end to end on a CUDA device emulated on the CPU (tests/emulated_cuda.py).

No GPU is lent to CI, and code never run on a device is broken on it. The emulator makes every
tensor "on cuda" a CPU tensor that says it is on cuda and enforces what a GPU enforces: no op mixes
a cuda tensor with a CPU tensor (bar 0-dim scalars, copies and CPU indices, as on CUDA), no random
op on cuda draws from a CPU generator, `torch.cuda.*`, `pin_memory` and `torch.autocast("cuda")`
behave as on a one-GPU machine. Under it:

  (a) the emulator itself: it fails where CUDA fails, and it catches the bug that the first GPU
      review found (rotary tables kept as plain attributes stay on the CPU after `.to("cuda")`);
  (b) every method's commands, as a user runs them with DDLM_DEVICE=cuda: train in bf16 with
      validation and its samples, resume, eval, every registered sampler, --infill, --infill-test,
      --show-html, eval --generate with a judge, eval --zero-shot, export -> import -> eval,
      quickstart (slow), the lm-eval adapter, the owt recipe at tiny scale (slow), and the GPU
      benchmark's CUDA-only code (benchmarks/device_bench.py);
  (c) fp32 training on the emulated device equals training on the CPU (the device branches of the
      trainer, such as pinned non-blocking loading and device generators, change no number).

What it cannot show: CUDA's kernels and their numerics, NCCL, compiled Triton code, memory; those
are benchmarks/device_check.sh's, on a real GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddlm.cli import main
from ddlm.methods.base import method_class, method_names
from emulated_cuda import EmulatedCuda, OnCuda

TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
        "--train.batch_size=4", "--train.progress=false"]
METHODS = method_names()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setenv("DDLM_DEVICE", "cuda")
    with EmulatedCuda() as emu:
        yield emu


# ------------------------------------------------------------------------ (a) the emulator itself

BEFORE = torch.ones(3, 4)  # made before any emulator: a CPU tensor all the same


def test_the_emulator_fails_where_cuda_fails(cuda):
    x = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        x * BEFORE
    with pytest.raises(RuntimeError, match="same device"):
        torch.nn.functional.linear(x, BEFORE)
    assert isinstance(x, OnCuda) and x.device.type == "cuda" and x.is_cuda
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.zeros(1, 4)])
    assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim CPU tensor is a scalar
    assert x[torch.tensor([0, 2])].shape == (2, 4)  # CPU indices are fine on CUDA
    with pytest.raises(RuntimeError, match="generator"):
        torch.rand(3, device="cuda", generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="generator"):
        torch.rand(3, generator=torch.Generator(device="cuda").manual_seed(0))
    with pytest.raises(RuntimeError, match="generator"):
        torch.multinomial(x.softmax(-1), 1, generator=torch.Generator().manual_seed(0))
    a = torch.rand(3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    b = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.cpu(), b)  # real numbers underneath


def test_the_emulator_moves_modules_counts_host_reads_and_autocasts(cuda):
    layer = torch.nn.Linear(4, 2).to("cuda")
    assert all(p.device.type == "cuda" and isinstance(p, torch.nn.Parameter) for p in layer.parameters())
    x = torch.randn(5, 4).pin_memory().to("cuda", non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    y.float().sum().backward()
    assert layer.weight.grad.device.type == "cuda"
    before = cuda.n_host_reads
    y.sum().item(), y.tolist(), y.cpu()
    assert cuda.n_host_reads == before + 3
    w = torch.randn(3, device="cuda", requires_grad=True)  # gradients flow through casts on the device
    (w * 2).to(torch.bfloat16).to("cuda", torch.float32).sum().backward()
    assert torch.equal(w.grad.cpu(), torch.full((3,), 2.0))


def test_the_emulator_catches_a_table_left_on_the_cpu(cuda, tmp_path, monkeypatch):
    """The first GPU review's bug: rotary cos/sin tables kept as plain attributes, so `.to("cuda")`
    leaves them behind and the first forward mixes devices."""
    from ddlm.nn.transformer import Rotary

    train = ["train", "--method", "mdlm", "--steps", "1", "--train.eval_every=0", *TINY]
    assert main([*train, "--out", str(tmp_path / "buffers")]) == 0
    init = Rotary.__init__

    def tables_as_attributes(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name in ("cos_table", "sin_table"):
            object.__setattr__(self, name, self._buffers.pop(name))

    monkeypatch.setattr(Rotary, "__init__", tables_as_attributes)
    with pytest.raises(RuntimeError, match="same device"):
        main([*train, "--out", str(tmp_path / "attributes")])


# --------------------------------------------------------- (b) every command of every method on cuda

@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """An MDLM run (EDLM starts from it) and an AR run (the judge), trained on the emulated device."""
    tmp = tmp_path_factory.mktemp("emulated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_DEVICE", "cuda")
        with EmulatedCuda():
            for name in ("mdlm", "ar"):
                assert main(["train", "--method", name, "--out", str(tmp / name), "--steps", "4",
                             "--train.eval_every=0", "--train.dtype=bf16", *TINY]) == 0
    return tmp


def run_json(args, capsys) -> dict:
    assert main([*args, "--json"]) == 0, args
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", METHODS)
def test_every_command_runs_on_cuda(name, base_runs, tmp_path, cuda, capsys):
    run = tmp_path / name
    init = ["--init", str(base_runs / "mdlm"), "--edlm.bound_draws=2"] if name == "edlm" else []
    train = ["train", "--method", name, "--out", str(run), "--train.eval_every=2", "--train.dtype=bf16",
             "--train.micro_batch_size=2", *TINY, *init]  # micro-batches: each draws from a cuda generator
    assert run_json([*train, "--steps", "4"], capsys)["step"] == 4
    assert run_json([*train, "--steps", "6"], capsys)["step"] == 6
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("split") == "valid"] == [2, 4, 6], "resumed, not restarted"
    assert any(m.get("samples") for m in metrics), "validation samples were drawn on cuda"
    scored = run_json(["eval", str(run), "--eval.max_batches=2"], capsys)
    assert scored["bpc"] > 0 and scored["tokens"] > 0
    for sampler in method_class(name).samplers:
        drawn = run_json(["sample", str(run), "--sampler", sampler, "--num", "2", "--steps", "8"], capsys)
        assert len(drawn["texts"]) == 2, sampler
    if name != "ar":
        filled = run_json(["sample", str(run), "--infill", "it is a [MASK:5] truth", "--num", "2",
                           "--steps", "8"], capsys)
        assert all("truth" in t for t in filled["texts"])
        assert run_json(["eval", str(run), "--infill-test", "4"], capsys)["bpc"] > 0
    run_json(["sample", str(run), "--num", "2", "--steps", "8", "--show-html", str(tmp_path / "w.html")], capsys)
    assert (tmp_path / "w.html").is_file()
    judged = run_json(["eval", str(run), "--generate", "--num", "2", "--gen-steps", "8",
                       "--judge", f"ar:{base_runs / 'ar'}"], capsys)
    assert judged["result"]["judges"][f"ar:{base_runs / 'ar'}"]["tokens"] > 0
    text = tmp_path / "zero_shot.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife.\n" * 20)
    assert run_json(["eval", str(run), "--data", str(text), "--zero-shot"], capsys)["bpc"] > 0
    if name != "edlm":  # EDLM exports its two models separately (one line, tested elsewhere)
        run_json(["export", str(run), "--to", "hf", str(tmp_path / "hf")], capsys)
        run_json(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")], capsys)
        again = run_json(["eval", str(tmp_path / "imported"), "--eval.max_batches=2"], capsys)
        assert again["bpc"] == pytest.approx(scored["bpc"], rel=1e-9), "export -> import changed the model"


@pytest.mark.slow
def test_quickstart_runs_on_cuda(tmp_path, cuda, capsys):
    report = run_json(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "3"], capsys)
    assert {"ar", "mdlm"} <= report.keys() and all(report[m]["test_bpc"] > 0 for m in ("ar", "mdlm"))


@pytest.mark.parametrize("name", METHODS)
def test_the_lm_eval_adapter_runs_on_cuda(name, base_runs, tmp_path, cuda):
    from lm_eval.api.instance import Instance

    from ddlm.interop.lm_eval import DdlmLM

    run = tmp_path / name
    init = ["--init", str(base_runs / "mdlm")] if name == "edlm" else []
    assert main(["train", "--method", name, "--out", str(run), "--steps", "2", "--train.eval_every=0",
                 "--train.dtype=bf16", *TINY, *init]) == 0
    lm = DdlmLM(pretrained=str(run), device="cuda", mc_samples=2, steps=4)
    asked = [Instance("loglikelihood", {}, ("it is a truth", " universally"), 0),
             Instance("loglikelihood", {}, ("it is a truth", " acknowledged"), 1)]
    scores = lm.loglikelihood(asked)
    assert len(scores) == 2 and all(lp < 0 for lp, _ in scores)
    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("it is a truth",), 0)])
    assert rolled[0] < 0
    written = lm.generate_until([Instance("generate_until", {}, ("it is", {"until": [], "max_gen_toks": 6}), 0)])
    assert 0 < len(written[0]) <= 6


def test_the_gpu_benchmark_runs_its_cuda_branches(tmp_path, cuda):
    """benchmarks/device_bench.py's CUDA-only code (CUDA events, peak memory, bf16 sampling rows)
    runs before a GPU session spends its minutes on it; torch.compile rows are for the real GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_bench", ROOT / "benchmarks" / "device_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--device", "cuda", "--no-compile", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("device_*.json")).read_text())
    assert result["device_type"] == "cuda" and not result["errors"], result["errors"]
    assert {r["method"] for r in result["train"]} == {"ar", "mdlm", "bd3"}
    assert all("peak_memory_gib" in r and r["dtype"] == "bf16" for r in result["train"])
    assert {r["dtype"] for r in result["sample"]} == {"fp32", "bf16"}


# ------------------------------------------------------------------- (c) cuda computes what cpu does

@pytest.mark.parametrize("name", ["ar", "mdlm", "bd3"])
def test_fp32_training_on_cuda_equals_training_on_the_cpu(name, tmp_path, monkeypatch):
    args = ["train", "--method", name, "--steps", "3", "--train.eval_every=0", "--train.dtype=fp32",
            "--train.micro_batch_size=2", *TINY]
    monkeypatch.setenv("DDLM_DEVICE", "cpu")
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    monkeypatch.setenv("DDLM_DEVICE", "cuda")
    with EmulatedCuda():
        assert main([*args, "--out", str(tmp_path / "cuda")]) == 0
    cpu, gpu = (load_file(next((tmp_path / d / "checkpoints").glob("step_*")) / "model.safetensors")
                for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    worst = max((cpu[k].double() - gpu[k].double()).abs().max().item() for k in cpu)
    assert worst < 1e-6, f"{name}: weights after 3 steps differ by {worst:.2e} between cpu and cuda"


@pytest.mark.slow
def test_the_owt_recipe_at_tiny_scale_runs_on_cuda(tmp_path, cuda):
    """`ddlm compare recipes/owt.yaml --scale tiny`: every row of the paper protocol (AR, MDLM, SEDD,
    BD3 L'=4/8/16 fine-tuned from MDLM, EDLM-AR and EDLM-NCE), trained, scored, sampled and judged."""
    from ddlm.compare.runner import compare

    results = compare(ROOT / "recipes" / "owt.yaml", tmp_path / "owt", quiet=True, scale="tiny")
    assert len(results["rows"]) >= 8
    for row in results["rows"]:
        assert row["seeds"][0]["likelihood"]["bpc"] > 0 and row["seeds"][0]["generation"], row["name"]
