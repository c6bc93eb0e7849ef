"""Importing the published MDLM, BD3-LM and SEDD DiT checkpoints (ddlm/interop/dit.py).

Each format is rebuilt here from the public code's key list and config form (tiny sizes, random
values, the real 50,258-id vocabulary), written as safetensors and imported. The logits are then
checked against a reference forward pass written in this file from the formulas of their DiT
(kuleshov-group/mdlm models/dit.py, bd3lms models/hf/modeling_bd3lm.py, SEDD model/transformer.py),
independently of ddlm's Transformer, in float64; ddlm runs in float32.
"""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddlm.build import load_for_inference
from ddlm.errors import CheckpointError, ConfigError
from ddlm.interop import dit
from ddlm.interop.rundir import write_run

D, HEADS, COND, LAYERS, LENGTH = 16, 2, 8, 2, 16
VOCAB, MASK = 50258, 50257  # theirs: GPT-2 + the mask as the last id
TOL = 1e-5


# ---- the published formats, from their code ------------------------------------------------

def published_keys(prefix: str, bd3: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of their state dict with its shape (DiT of the public repositories)."""
    hd, M = D // HEADS, 4 * D
    keys = {"vocab_embed.embedding": (VOCAB, D), "sigma_map.mlp.0.weight": (COND, 256),
            "sigma_map.mlp.0.bias": (COND,), "sigma_map.mlp.2.weight": (COND, COND),
            "sigma_map.mlp.2.bias": (COND,), "rotary_emb.inv_freq": (hd // 2,),
            "output_layer.norm_final.weight": (D,), "output_layer.linear.weight": (VOCAB, D),
            "output_layer.linear.bias": (VOCAB,), "output_layer.adaLN_modulation.weight": (2 * D, COND),
            "output_layer.adaLN_modulation.bias": (2 * D,)}
    for i in range(LAYERS):
        keys.update({f"blocks.{i}.norm1.weight": (D,), f"blocks.{i}.attn_qkv.weight": (3 * D, D),
                     f"blocks.{i}.attn_out.weight": (D, D), f"blocks.{i}.norm2.weight": (D,),
                     f"blocks.{i}.mlp.0.weight": (M, D), f"blocks.{i}.mlp.0.bias": (M,),
                     f"blocks.{i}.mlp.2.weight": (D, M), f"blocks.{i}.mlp.2.bias": (D,),
                     f"blocks.{i}.adaLN_modulation.weight": (6 * D, COND),
                     f"blocks.{i}.adaLN_modulation.bias": (6 * D,)})
    keys = {prefix + k: v for k, v in keys.items()}
    if bd3:
        keys.update({"sampling_eps_min": (), "sampling_eps_max": ()})
    return keys


def random_state(prefix: str, bd3: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every key; LayerNorm weights near 1, everything else modest, so that no
    branch (gates and modulation included) is zero."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_keys(prefix, bd3).items():
        value = torch.randn(shape, generator=g) * 0.2
        if "norm" in key:
            value = 1 + 0.1 * value
        state[key] = value
    hd = D // HEADS
    state[prefix + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    if bd3:
        state["sampling_eps_min"], state["sampling_eps_max"] = torch.tensor(1e-3), torch.tensor(1.0)
    return state


def hf_config(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "architectures": [model_type.upper()], "return_dict": False,
            "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": D, "cond_dim": COND,
            "n_blocks": LAYERS, "n_heads": HEADS, "dropout": 0.1, "time_conditioning": False, **extra}


def sedd_config() -> dict:
    return {"ngpus": 8, "tokens": 50257,
            "model": {"name": "small", "type": "ddit", "hidden_size": D, "cond_dim": COND, "length": LENGTH,
                      "n_blocks": LAYERS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1},
            "graph": {"type": "absorb", "file": "data", "report_all": False},
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20}}


FORMATS = {
    "mdlm": (lambda: hf_config("mdlm"), "backbone.", False),
    "bd3": (lambda: hf_config("bd3lm", block_size=4, cross_attn=True, adaln=True, causal=False,
                              attn_backend="sdpa", var_min=True), "backbone.", True),
    "sedd": (sedd_config, "", False),
}


def write_folder(path, config, state, name="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, str(path / name))
    return path


def published(tmp_path, fmt: str, seed: int = 0):
    make_config, prefix, bd3 = FORMATS[fmt]
    state = random_state(prefix, bd3, seed)
    return write_folder(tmp_path / fmt, make_config(), state), state


# ---- a reference forward pass, from their formulas ------------------------------------------

def rotate(x, positions):
    """Rotate-half RoPE, base 10,000, on x (B, L, H, hd) at positions (L,)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv_freq  # (L, hd/2)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def norm(x, weight, shift, scale):
    return F.layer_norm(x, x.shape[-1:]) * weight * (1 + scale) + shift


def reference_logits(state, prefix, tokens, sigma, allowed=None, positions=None):
    """Their DiT: tokens (B, L) and sigma (B,) -> logits (B, L, 50258), float64. `allowed` (L, L)
    is the attention mask (None: bidirectional); `positions` the rotary positions."""
    w = {k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)}
    B, L = tokens.shape
    positions = torch.arange(L) if positions is None else positions
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.double()[:, None] * freqs
    features = torch.cat([args.cos(), args.sin()], -1)
    t_emb = F.linear(F.silu(F.linear(features, w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"])),
                     w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"])
    c = F.silu(t_emb)
    x = w["vocab_embed.embedding"][tokens]
    for i in range(LAYERS):
        b = {k[len(f"blocks.{i}."):]: v for k, v in w.items() if k.startswith(f"blocks.{i}.")}
        shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(
            c, b["adaLN_modulation.weight"], b["adaLN_modulation.bias"])[:, None].chunk(6, -1)
        h = norm(x, b["norm1.weight"], shift1, scale1)
        qkv = (h @ b["attn_qkv.weight"].T).view(B, L, 3, HEADS, D // HEADS)  # (three h d) order
        q, k, v = rotate(qkv[:, :, 0], positions), rotate(qkv[:, :, 1], positions), qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, D)
        x = x + gate1 * (attended @ b["attn_out.weight"].T)
        h = norm(x, b["norm2.weight"], shift2, scale2)
        y = F.linear(F.gelu(F.linear(h, b["mlp.0.weight"], b["mlp.0.bias"]), approximate="tanh"),
                     b["mlp.2.weight"], b["mlp.2.bias"])
        x = x + gate2 * y
    shift, scale = F.linear(c, w["output_layer.adaLN_modulation.weight"],
                            w["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, -1)
    h = norm(x, w["output_layer.norm_final.weight"], shift, scale)
    return F.linear(h, w["output_layer.linear.weight"], w["output_layer.linear.bias"])


def their_subs(logits, zt):
    """MDLM/BD3-LM SUBS: -1e6 on the mask logit, normalised; unmasked positions one-hot."""
    logits = logits.clone()
    logits[..., MASK] += -1e6
    logits = logits - logits.logsumexp(-1, keepdim=True)
    unmasked = zt != MASK
    logits[unmasked] = -1e6
    logits[unmasked, zt[unmasked]] = 0
    return logits


def their_sedd_scores(logits, xt, sigma):
    """SEDD's scale_by_sigma (absorbing): logits - log expm1(sigma) - log(V - 1); 0 at x_t."""
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
    out = logits - esigm1.log()[:, None, None] - math.log(logits.shape[-1] - 1)
    return torch.scatter(out, -1, xt[..., None], torch.zeros_like(out[..., :1]))


def block_diffusion_allowed(L, block):
    """Their block_diff_mask over x_t (+) x_0 (2L, 2L)."""
    idx = torch.arange(2 * L)
    clean = idx >= L
    blk = torch.where(clean, idx - L, idx) // block
    q_clean, k_clean, q_blk, k_blk = clean[:, None], clean[None], blk[:, None], blk[None]
    diagonal = (q_blk == k_blk) & (q_clean == k_clean)
    offset_causal = (q_blk > k_blk) & k_clean & ~q_clean
    causal = (q_blk >= k_blk) & k_clean & q_clean
    return diagonal | offset_causal | causal


# ---- helpers ---------------------------------------------------------------------------------

def imported_run(tmp_path, fmt, method=None):
    src, state = published(tmp_path, fmt)
    imported = dit.import_dit(src, method)
    write_run(imported, tmp_path / f"run-{fmt}-{method}")
    return load_for_inference(tmp_path / f"run-{fmt}-{method}", torch.device("cpu")), imported, state


def noisy_tokens(seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 50257, (B, LENGTH), generator=g)
    masked = torch.rand(B, LENGTH, generator=g) < 0.5
    return x0, torch.where(masked, torch.full_like(x0, MASK), x0)


def one_line_error(src, match, method=None):
    with pytest.raises(CheckpointError, match=match) as info:
        dit.import_dit(src, method)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- detection, config and round trip ----------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_detect_and_import_config(tmp_path, fmt):
    src, _ = published(tmp_path, fmt)
    assert dit.detect(src) == fmt
    imported = dit.import_dit(src)
    run = imported.run
    assert run.method == fmt and imported.architecture == dit.ARCHITECTURES[fmt]
    m = run.model
    assert (m.dim, m.n_layers, m.n_heads, m.cond_dim, m.max_len, m.block) == (D, LAYERS, HEADS, COND, LENGTH, "gated")
    assert (m.vocab_size, m.output_vocab, run.data.tokenizer, run.data.seq_len) == (50259, VOCAB, "gpt2", LENGTH)
    options = run.method_options
    assert options.time_conditioning is (fmt == "sedd")
    assert options.schedule == "loglinear" and options.sampling_eps == 1e-3
    assert options.eps == (1e-9 if fmt == "bd3" else 1e-3)
    if fmt == "bd3":
        assert options.block_size == 4 and (options.clip_min, options.clip_max) == (0.0, 1.0)
    if fmt == "sedd":
        assert options.graph == "absorbing"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weights_round_trip(tmp_path, fmt):
    """their names -> ddlm's (imported, written, loaded) -> their names: the same tensors, and
    the appended pad rows are zero."""
    loaded, imported, state = imported_run(tmp_path, fmt)
    source = dit.read_source(tmp_path / fmt)
    back = dit.to_reference({k: v.cpu() for k, v in loaded.model.state_dict().items()}, source)
    weights = {k: v for k, v in state.items() if k in dit.key_table(source)}
    assert back.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(back[key], value), key
    for key in dit.VOCAB_ROWS:
        assert imported.weights[key].shape[0] == 50259 and not imported.weights[key][VOCAB:].any()


def test_huggingface_cache_folder(tmp_path):
    """A huggingface_hub cache folder resolves to the snapshot refs/main names."""
    cache = tmp_path / "models--kuleshov-group--mdlm-owt"
    published(cache / "snapshots", "mdlm")  # the snapshot folder is named "mdlm" here
    published(cache / "snapshots" / "old", "sedd")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("mdlm\n")
    assert dit.detect(cache) == "mdlm"
    assert dit.import_dit(cache).source == str(cache / "snapshots" / "mdlm")


def test_detect_from_keys_without_config(tmp_path):
    for fmt in FORMATS:
        src, _ = published(tmp_path / "keys", fmt)
        (src / "config.json").unlink()
        assert dit.detect(src) == fmt
        one_line_error(src, "no config.json")


# ---- logits against the reference forward ------------------------------------------------------

def test_mdlm_logits_match_reference(tmp_path):
    loaded, _, state = imported_run(tmp_path, "mdlm")
    x0, zt = noisy_tokens()
    t = torch.full((2, 1), 0.5, dtype=torch.float64)
    with torch.no_grad():
        logits = loaded.model(zt, mask="bidirectional")
        ours = loaded.method.log_x_theta(loaded.model, zt, t)
    ref = reference_logits(state, "backbone.", zt, torch.zeros(2))  # time_conditioning false: sigma 0
    assert (logits[..., :VOCAB].double() - ref).abs().max() < TOL
    assert (logits[..., VOCAB:] <= -1e3).all()  # the pad id is never emitted
    theirs = their_subs(ref, zt)
    masked = zt == MASK
    assert (ours[masked][:, :MASK].double() - theirs[masked][:, :MASK]).abs().max() < TOL
    assert ours[..., VOCAB:].exp().max() == 0 and ours[..., MASK].exp().max() == 0
    assert torch.equal(ours[~masked].argmax(-1), zt[~masked])


def test_mdlm_time_conditioned_feeds_total_noise(tmp_path):
    src, state = published(tmp_path, "mdlm")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "time_conditioning": True}))
    imported = dit.import_dit(src)
    write_run(imported, tmp_path / "run")
    loaded = load_for_inference(tmp_path / "run", torch.device("cpu"))
    _, zt = noisy_tokens()
    t = torch.tensor([[0.3], [0.8]], dtype=torch.float64)
    sigma = -torch.log1p(-(1 - 1e-3) * t[:, 0])  # their log-linear total noise
    with torch.no_grad():
        ours = loaded.method.log_x_theta(loaded.model, zt, t)
    theirs = their_subs(reference_logits(state, "backbone.", zt, sigma), zt)
    masked = zt == MASK
    assert (ours[masked][:, :MASK].double() - theirs[masked][:, :MASK]).abs().max() < TOL


def test_bd3_logits_match_reference(tmp_path):
    """BD3-LM's vectorised pass: x_t (+) x_0 under their block-diffusion mask, both halves at
    positions 0..L-1, the x_t half scored."""
    loaded, _, state = imported_run(tmp_path, "bd3")
    x0, zt = noisy_tokens(seed=2)
    t = torch.full((2, LENGTH // 4), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ours = loaded.method.log_x_theta(loaded.model, zt, t, x0=x0)
    ref = reference_logits(state, "backbone.", torch.cat([zt, x0], 1), torch.zeros(2),
                           allowed=block_diffusion_allowed(LENGTH, 4), positions=torch.arange(LENGTH).repeat(2))
    theirs = their_subs(ref[:, :LENGTH], zt)
    masked = zt == MASK
    assert (ours[masked][:, :MASK].double() - theirs[masked][:, :MASK]).abs().max() < TOL


def sedd_scores(tmp_path):
    loaded, _, state = imported_run(tmp_path, "sedd")
    _, xt = noisy_tokens(seed=3)
    t = torch.tensor([[0.2], [0.9]], dtype=torch.float64)
    sigma = -torch.log1p(-(1 - 1e-3) * t[:, 0])
    with torch.no_grad():
        logits = loaded.model(xt, sigma=sigma.float(), mask="bidirectional")
        ours = loaded.method.log_score(loaded.model, xt, t)
    ref = reference_logits(state, "", xt, sigma.float().double())
    theirs = their_sedd_scores(ref, xt, sigma)
    others = torch.ones_like(ours, dtype=torch.bool)
    others[..., VOCAB:] = False
    others.scatter_(-1, xt[..., None], False)  # their x_t entry is 0 by definition, ddlm's -inf
    return logits, ref, ours, theirs, others


def test_sedd_network_matches_reference(tmp_path):
    logits, ref, ours, _, _ = sedd_scores(tmp_path)
    assert (logits[..., :VOCAB].double() - ref).abs().max() < TOL
    assert torch.isneginf(ours[..., VOCAB:]).all() or ours[..., VOCAB:].exp().max() == 0


def test_sedd_scores_match_reference(tmp_path):
    _, _, ours, theirs, others = sedd_scores(tmp_path)
    keep = others[..., :VOCAB]
    assert (ours[..., :VOCAB][keep] - theirs[keep]).abs().max() < TOL


# ---- as an ordinary run --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_likelihood_runs(tmp_path, fmt):
    loaded, _, _ = imported_run(tmp_path, fmt)
    x0, _ = noisy_tokens(seed=4)
    bound = loaded.method.nll_bound(loaded.model, x0, n_samples=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(bound.nll).all() and (bound.nll > 0).all() and (bound.tokens == LENGTH).all()


def test_method_override(tmp_path):
    """An MDLM checkpoint as BD3-LM gets one block of the whole context (MDLM exactly); BD3-LM as
    MDLM keeps its schedule; another method is one line."""
    src, _ = published(tmp_path, "mdlm")
    assert dit.import_dit(src, "bd3").run.method_options.block_size == LENGTH
    bd3_src, _ = published(tmp_path, "bd3")
    assert dit.import_dit(bd3_src, "mdlm").run.method_options.eps == 1e-9
    with pytest.raises(ConfigError, match="not 'ar'"):
        dit.import_dit(src, "ar")


def test_bd3_window_buffers(tmp_path):
    src, state = published(tmp_path, "bd3")
    state["sampling_eps_min"], state["sampling_eps_max"] = torch.tensor(0.3), torch.tensor(0.8)
    save_file(state, str(src / "model.safetensors"))
    options = dit.import_dit(src).run.method_options
    assert (options.clip_min, options.clip_max, options.clip_mode) == (pytest.approx(0.3), pytest.approx(0.8), "mask")


# ---- malformed folders: one line each -------------------------------------------------------------

def test_missing_key(tmp_path):
    src, state = published(tmp_path, "mdlm")
    del state["backbone.blocks.1.mlp.0.bias"]
    save_file(state, str(src / "model.safetensors"))
    one_line_error(src, r"missing key 'backbone\.blocks\.1\.mlp\.0\.bias'")


def test_extra_key(tmp_path):
    src, state = published(tmp_path, "sedd")
    state["blocks.0.attn_qkv.bias"] = torch.zeros(3 * D)
    save_file(state, str(src / "model.safetensors"))
    one_line_error(src, r"unexpected key 'blocks\.0\.attn_qkv\.bias'")


def test_wrong_shape(tmp_path):
    src, state = published(tmp_path, "bd3")
    state["backbone.blocks.0.attn_out.weight"] = torch.zeros(D, D + 2)
    save_file(state, str(src / "model.safetensors"))
    one_line_error(src, r"'backbone\.blocks\.0\.attn_out\.weight' has shape \(16, 18\)")


def test_wrong_rotary_base(tmp_path):
    src, state = published(tmp_path, "mdlm")
    state["backbone.rotary_emb.inv_freq"] = state["backbone.rotary_emb.inv_freq"] ** 0.5
    save_file(state, str(src / "model.safetensors"))
    one_line_error(src, "not RoPE base 10000")


class _Touch:
    """A pickle that creates a file when unpickled: proof the importer never unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_refused_unopened(tmp_path):
    src = write_folder(tmp_path / "bin", hf_config("mdlm"), None)
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    message = one_line_error(src, "pytorch_model.bin' is a pickle")
    assert "safetensors" in message and not marker.exists()
    # `ddlm import`: a config it cannot use does not hide the pickle, the weights are named first
    from ddlm.interop.import_ import read_source

    for config in ({"model_type": "mdlm"}, {"model_type": "llama"}, {"model_type": "gpt2"}):
        (src / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="pytorch_model.bin' is a pickle"):
            read_source(src)
    assert not marker.exists()


def test_unknown_architecture(tmp_path):
    src, _ = published(tmp_path, "mdlm")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert dit.detect(src) is None
    one_line_error(src, "unknown architecture.*'llama'")


@pytest.mark.parametrize("text, match", [
    ("[1, 2", "cannot be read"),
    ("[1, 2]", "not a mapping"),
    ("[" * 100000 + "]" * 100000, "cannot be read|nested too deeply"),
    (json.dumps(hf_config("mdlm", hidden_dim="wide")), "field 'hidden_dim' is 'wide'; expected int"),
    (json.dumps({k: v for k, v in hf_config("mdlm").items() if k != "n_heads"}), "lacks the field 'n_heads'"),
    (json.dumps(hf_config("mdlm", vocab_size=50257)), "vocabulary 50257 is not GPT-2"),
    (json.dumps(hf_config("bd3lm", block_size=5)), "block_size 5 does not divide"),
    (json.dumps(hf_config("bd3lm", block_size=4, adaln=False)), "adaln=false is not supported"),
    (json.dumps({**sedd_config(), "graph": {"type": "uniform"}}), "graph type 'uniform'"),
])
def test_garbage_config(tmp_path, text, match):
    src, _ = published(tmp_path, "mdlm")
    (src / "config.json").write_text(text)
    one_line_error(src, match)


def test_not_safetensors(tmp_path):
    src = write_folder(tmp_path / "bad", hf_config("mdlm"), None)
    (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    one_line_error(src, "not a readable safetensors file")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ddlm_import_command_then_sample(tmp_path, capsys, fmt):
    from ddlm.cli import main

    src, _ = published(tmp_path, fmt)
    assert main(["import", str(src), "--out", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == fmt and report["tokenizer"] == "gpt2"
    assert main(["sample", str(tmp_path / "run"), "--num", "1", "--length", "8", "--steps", "2", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["length"] == 8 and len(sampled["texts"]) == 1 and sampled["method"] == fmt
