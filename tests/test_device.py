"""The GPU path, checked here on the CPU and the meta device (and on CUDA where torch sees one).

  (a) every tensor a model of every registered method holds (parameters, buffers, non-persistent
      ones too, and any tensor kept as a plain attribute of a submodule) follows `.to(device)`;
  (b) a model moved to the meta device, materialised with `.to_empty` and re-initialised
      (`init_buffers`) computes what the original computes once it has its weights; the derived
      tables never enter the state dict;
  (c) a forward + backward of every method's loss, and one call of every method's default
      sampler, on each device of the `device` fixture (bf16 autocast on CUDA, fp32 on the CPU);
  (d) the rotary tables: a slice of the buffer for a contiguous range (no host read), computed on
      the fly past the table (sliding windows), bit-identical to the direct computation;
  (e) torch.compile(fullgraph=True) traces the transformer's forward (bidirectional and causal,
      no logits_at) and backward without a graph break;
  (f) benchmarks/device_bench.py --tiny runs on the CPU and writes the JSON it promises.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ddlm import runtime
from ddlm.config import ModelConfig, SampleConfig
from ddlm.methods.base import method_names
from ddlm.nn.transformer import Rotary, Transformer

from conftest import tiny_built

METHODS = method_names()
TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2}
SEQ_LEN = 16
ROOT = Path(__file__).resolve().parent.parent


def built(name: str, seed: int = 0, perturb: float = 0.2):
    """(tokenizer, method, model) of this file's tiny model, every parameter jittered by
    N(0, perturb^2) so that zero-initialised gates do not hide the input (conftest.tiny_built)."""
    return tiny_built(name, TINY_MODEL, SEQ_LEN, seed, perturb)[1:]


def text_ids(tokenizer, n: int, length: int, seed: int, device="cpu") -> torch.Tensor:
    """(n, length) random ids of ordinary symbols (no BOS, MASK or PAD)."""
    specials = {tokenizer.bos_id, tokenizer.mask_id, tokenizer.pad_id}
    allowed = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in specials])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(0, len(allowed), (n, length), generator=g)].to(device)


def held_tensors(model: torch.nn.Module):
    """(name, tensor) of everything the model holds: parameters, buffers (persistent or not) and
    every tensor reachable from a submodule's own attributes (inside tuples, lists and dicts too)."""
    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                yield from walk(f"{prefix}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{prefix}[{k!r}]", v)

    yield from model.named_parameters()
    yield from model.named_buffers()
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            yield from walk(f"{mod_name}.{attr}" if mod_name else attr, value)


# ------------------------------------------------------------------ (a) every tensor follows .to

@pytest.mark.parametrize("name", METHODS)
def test_every_tensor_moves_to_the_meta_device(name):
    model = built(name)[2].to("meta")
    stayed = [f"{n} on {t.device}" for n, t in held_tensors(model) if t.device.type != "meta"]
    assert not stayed, f"{name}: left behind by .to('meta'): {stayed}"
    # and the derived tables are there to be moved: a Transformer holds its rotary tables as buffers
    rotary = [m for m in model.modules() if isinstance(m, Rotary)]
    assert rotary and all(dict(m.named_buffers()).keys() >= {"inv_freq", "cos_table", "sin_table"}
                          for m in rotary)


# ------------------------------------------------- (b) meta -> to_empty -> init_buffers -> load

@pytest.mark.parametrize("name", METHODS)
def test_to_empty_and_init_buffers_give_the_original_model(name):
    from ddlm.nn.transformer import init_buffers

    tokenizer, method, model = built(name)
    model.eval()
    state = model.state_dict()
    assert not [k for k in state if "rotary" in k or k.endswith("freqs")], "derived tables are not weights"
    other = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    init_buffers(other)
    other.load_state_dict(state)
    other.eval()
    for (n, a), (_, b) in zip(model.named_buffers(), other.named_buffers()):
        assert torch.equal(a, b), n
    x = text_ids(tokenizer, 2, SEQ_LEN, seed=0)
    with torch.no_grad():
        out_a = method.loss(model, x, generator=torch.Generator().manual_seed(0)).token_nll
        out_b = method.loss(other, x, generator=torch.Generator().manual_seed(0)).token_nll
    assert torch.equal(out_a, out_b)


def test_a_model_built_on_the_meta_device_materialises():
    """FSDP2's way: build under torch.device('meta'), to_empty on the target and init the buffers
    there (the weights come from the init or a checkpoint); the tables equal those built on the CPU."""
    cfg = ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=1, n_heads=2)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.rotary.cos_table.is_meta
    model.to_empty(device="cpu")
    model.init_buffers()
    reference = Transformer(cfg)
    for (n, a), (_, b) in zip(reference.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n


# --------------------------------------------------------------- (c) each method on each device

@pytest.mark.parametrize("name", METHODS)
def test_loss_forward_backward_on_device(name, device):
    tokenizer, method, model = built(name)
    model.to(device).train()
    x0 = text_ids(tokenizer, 4, SEQ_LEN, seed=0, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with runtime.autocast(dtype, device):
        out = method.loss(model, x0, generator=torch.Generator(device=device).manual_seed(0))
    assert out.loss.device.type == device.type and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for _, g in grads)
    assert any(g.any() for _, g in grads)


@pytest.mark.parametrize("name", METHODS)
def test_default_sampler_on_device(name, device):
    """Past the context (16): a prompt of 5 and 20 new tokens (AR's cache, windows elsewhere)."""
    tokenizer, method, model = built(name)
    model.to(device).eval()
    prompt = text_ids(tokenizer, 1, 5, seed=1, device=device)[0]
    sampler = method.sampler(SampleConfig(steps=4))
    g = torch.Generator(device=device).manual_seed(0)
    out = sampler.generate(model, 2, 20, prompt=prompt, generator=g)
    assert out.tokens.device.type == device.type and out.tokens.shape == (2, 25) and out.nfe > 0
    assert torch.equal(out.tokens[:, :5], prompt.expand(2, 5))
    assert not (out.tokens == tokenizer.mask_id).any()


# ------------------------------------------------------------------------- (d) rotary tables

def direct(rotary: Rotary, positions: torch.Tensor):
    angles = positions.float()[:, None] * rotary.inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def test_rotary_slices_its_table_and_computes_past_it():
    rotary = Rotary(16, 10000.0)
    rotary.precompute(32)
    assert rotary.cos_table.shape == (32, 16)
    for start, length in ((0, 32), (5, 7), (31, 1), (30, 5), (40, 9)):  # within, across, past the table
        cos, sin = rotary.span(start, length)
        ref_cos, ref_sin = direct(rotary, torch.arange(start, start + length))
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (start, length)
        cos, sin = rotary.cos_sin(torch.arange(start, start + length))
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (start, length)
    within = rotary.span(3, 4)[0]
    assert within.data_ptr() == rotary.cos_table[3].data_ptr()  # a view of the buffer, not a copy
    bd3 = torch.arange(8).repeat(2)  # BD3-LM's x_t (+) x_0 positions
    assert torch.equal(rotary.cos_sin(bd3)[0], direct(rotary, bd3)[0])


def test_explicit_positions_equal_the_default_bit_for_bit():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=2, n_heads=2,
                                    block="gated")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x, mask="causal"), model(x, mask="causal", positions=torch.arange(12)))
        far = torch.arange(100, 112)  # past the table of 2 * max_len = 32 positions
        cache = model.new_cache(2, 200)
        cache.advance(100)
        assert torch.equal(model(x, mask="bidirectional", cache=cache, cache_write=False),
                           model(x, mask="bidirectional", positions=far, cache=cache, cache_write=False))


def test_rotary_state_dict_is_empty_and_loads_into_a_bare_model():
    model = Transformer(ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=1, n_heads=2))
    assert not [k for k in model.state_dict() if k.startswith("rotary.")]
    other = Transformer(ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=1, n_heads=2))
    other.load_state_dict(model.state_dict(), strict=True)


# ---------------------------------------------------------------------------- (e) torch.compile

@pytest.mark.parametrize("mask", ["bidirectional", "causal", "bd3"])
@pytest.mark.parametrize("block", ["gated", "plain"])
def test_compiled_forward_has_no_graph_break(mask, block):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward (RotaryQKV's
    custom autograd function) without generating kernels. bd3: BD3-LM's vectorised pass over
    x_t (+) x_0 (explicit positions 0..L-1 twice, query-group mask, logits_for), no logits_at."""
    from ddlm.nn.attention import block_diffusion_groups

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=2, n_heads=2, block=block,
                      time_conditioning=block == "plain")
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sigma = torch.rand(2) if block == "plain" else None
    kw = {"sigma": sigma, "mask": mask}
    x = torch.randint(0, 11, (2, 16))
    if mask == "bd3":
        x = torch.randint(0, 11, (2, 32))
        kw.update(mask=block_diffusion_groups(16, 4, "cpu"), positions=torch.arange(16).repeat(2), logits_for=16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, **kw)
    torch.testing.assert_close(out, model(x, **kw), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_inductor_compiled_forward_has_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=16, dim=32, n_layers=2, n_heads=2, block="gated"))
    x = torch.randint(0, 11, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    for mask in ("bidirectional", "causal"):
        torch.testing.assert_close(compiled(x, mask=mask), model(x, mask=mask), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ (f) the GPU benchmark

def test_device_bench_tiny_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("device_bench", ROOT / "benchmarks" / "device_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    files = list(tmp_path.glob("device_*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert not result["errors"], [e["error"] for e in result["errors"]]
    assert not result["skipped"]
    assert {"device", "torch", "matmul_bf16_flops", "flops_definition", "train", "sample"} <= result.keys()
    methods = {r["method"] for r in result["train"]}
    assert methods == {"ar", "mdlm", "bd3"}
    for r in result["train"]:
        assert {"size", "compile", "batch", "seq_len", "tokens_per_s", "flops_per_token", "mfu"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
    assert {r["compile"] for r in result["train"]} == {False, True}
    assert {(r["method"], r["batch"]) for r in result["sample"]} >= {("ar", 1), ("mdlm", 1), ("bd3", 1)}
    assert all(r["tokens_per_s"] > 0 for r in result["sample"])
