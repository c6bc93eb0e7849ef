"""Parity of ddlm's MDLM, BD3-LM and SEDD imports with the public modeling code, on random weights.

Runs the real DiT code of the public repositories beside ddlm's import of the same weights and
prints the largest |difference| of the logits (and of each method's parameterised output):

    python benchmarks/parity_reference.py \
        --mdlm /work/.mirror/kuleshov-group+mdlm/repo \
        --bd3 /work/.mirror/kuleshov-group+bd3lms/repo \
        --sedd /work/.mirror/louaaron+Score-Entropy-Discrete-Diffusion/repo

Each path is a git directory (a bare mirror: files are read from HEAD) or a checkout. Their code
needs einops, omegaconf, huggingface_hub and transformers. flash-attn (GPU only) is replaced by a
stub module written here: `flash_attn_varlen_qkvpacked_func` as SDPA over the equal-length rows
(softmax scale 1/sqrt(head size), no mask) and `apply_rotary_emb_qkv_` as flash-attn's
non-interleaved rotation of q and k (the rotate-half form that SEDD's own fallback uses). BD3-LM's
HF code runs with attn_backend=sdpa (its FlexAttention path is the same mask, compiled). Weights:
their own module's state dict with every parameter redrawn, written as the published folder form
(config + model.safetensors) and imported with ddlm.interop.dit. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddlm.build import load_for_inference
from ddlm.interop import dit
from ddlm.interop.rundir import write_run

MASK = 50257
VOCAB = 50258
RESULTS = Path(__file__).parent / "results" / "parity_reference.json"
SIZES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, cond_dim=32, length=64),
         "small": dict(dim=768, n_layers=12, n_heads=12, cond_dim=128, length=128)}


# ---- their files, and a stub for flash-attn ------------------------------------------------------

def read_source(repo: Path, path: str) -> str:
    """A file of a checkout, or of HEAD of a (bare) git directory."""
    if (repo / path).is_file():
        return (repo / path).read_text()
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def head_commit(repo: Path) -> str:
    out = subprocess.run(["git", "--git-dir", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "checkout"


def varlen_attention(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, causal=False, **_):
    """flash-attn's packed varlen attention for rows of equal length: qkv (B*S, 3, H, hd) -> (B*S, H, hd)."""
    total, _, H, hd = qkv.shape
    q, k, v = qkv.view(total // max_seqlen, max_seqlen, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, S, hd)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(total, H, hd)


def rotary_qkv_inplace(qkv, cos, sin, **_):
    """flash-attn's apply_rotary_emb_qkv_ (non-interleaved): q and k of qkv (B, S, 3, H, hd) rotated
    in place by cos, sin (S, hd/2); v untouched."""
    half = cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    for i in (0, 1):
        x1, x2 = qkv[:, :, i, :, :half].clone(), qkv[:, :, i, :, half:2 * half].clone()
        qkv[:, :, i, :, :half] = x1 * c - x2 * s
        qkv[:, :, i, :, half:2 * half] = x2 * c + x1 * s
    return qkv


@contextlib.contextmanager
def flash_attn_stub():
    """The stub importable while their module is imported (their module keeps its reference), then
    gone again, so that transformers never mistakes it for an installed flash-attn."""
    root = types.ModuleType("flash_attn")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface.flash_attn_varlen_qkvpacked_func = varlen_attention
    layers = types.ModuleType("flash_attn.layers")
    rotary = types.ModuleType("flash_attn.layers.rotary")
    rotary.apply_rotary_emb_qkv_ = rotary_qkv_inplace
    root.flash_attn_interface, root.layers, layers.rotary = interface, layers, rotary
    stubs = {"flash_attn": root, "flash_attn.flash_attn_interface": interface,
             "flash_attn.layers": layers, "flash_attn.layers.rotary": rotary}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def package_from(repo: Path, files: dict[str, str], name: str, workdir: Path, main: str,
                 needs_flash: bool = True):
    """Write their files as package `name` under workdir and import its module `main` (with the
    flash-attn stub when it needs flash-attn)."""
    pkg = workdir / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for target, source in files.items():
        (pkg / target).write_text(read_source(repo, source))
    if str(workdir) not in sys.path:
        sys.path.insert(0, str(workdir))
    with flash_attn_stub() if needs_flash else contextlib.nullcontext():
        return importlib.import_module(f"{name}.{main}")


# ---- their models ----------------------------------------------------------------------------

def mdlm_model(repo: Path, size: dict, workdir: Path):
    module = package_from(repo, {"dit.py": "models/dit.py"}, "their_mdlm", workdir, "dit")
    config = {"model": {"hidden_size": size["dim"], "cond_dim": size["cond_dim"], "length": size["length"],
                        "n_blocks": size["n_layers"], "n_heads": size["n_heads"], "scale_by_sigma": True,
                        "dropout": 0.1}}
    hf = {"model_type": "mdlm", "vocab_size": VOCAB, "model_length": size["length"], "hidden_dim": size["dim"],
          "cond_dim": size["cond_dim"], "n_blocks": size["n_layers"], "n_heads": size["n_heads"],
          "dropout": 0.1, "time_conditioning": False}
    return module.DIT(config, vocab_size=VOCAB), hf, "backbone."


def bd3_model(repo: Path, size: dict, workdir: Path, block_size: int):
    module = package_from(repo, {"configuration_bd3lm.py": "models/hf/configuration_bd3lm.py",
                                 "modeling_bd3lm.py": "models/hf/modeling_bd3lm.py"}, "their_bd3", workdir,
                          "modeling_bd3lm", needs_flash=False)
    hf = {"model_type": "bd3lm", "block_size": block_size, "vocab_size": VOCAB, "model_length": size["length"],
          "hidden_dim": size["dim"], "cond_dim": size["cond_dim"], "n_blocks": size["n_layers"],
          "n_heads": size["n_heads"], "dropout": 0.1, "time_conditioning": False, "cross_attn": True,
          "adaln": True, "causal": False, "attn_backend": "sdpa", "var_min": True,
          "sampling_eps_min": 1e-3, "sampling_eps_max": 0.999, "return_dict": False}
    config = module.BD3LMConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    return module.BD3LM(config), hf, ""


def sedd_model(repo: Path, size: dict, workdir: Path):
    files = {"transformer.py": "model/transformer.py", "rotary.py": "model/rotary.py",
             "fused_add_dropout_scale.py": "model/fused_add_dropout_scale.py"}
    module = package_from(repo, files, "their_sedd", workdir, "transformer")
    config = {"tokens": 50257, "graph": {"type": "absorb", "file": "data", "report_all": False},
              "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
              "model": {"name": "small", "type": "ddit", "hidden_size": size["dim"], "cond_dim": size["cond_dim"],
                        "length": size["length"], "n_blocks": size["n_layers"], "n_heads": size["n_heads"],
                        "scale_by_sigma": True, "dropout": 0.1}}
    return module.SEDD(config), config, ""


# ---- weights, import, comparison -----------------------------------------------------------

def randomise(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter (buffers, such as the rotary frequencies, stay as built): LayerNorm
    weights 1 + 0.1 N(0, 1); matrices N(0, (1.5 / sqrt(fan_in))^2), the output layer a third of
    that; biases and the rest N(0, 0.2^2). Nothing is zero (gates included), and activations keep
    their scale through the blocks at any width."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.randn(p.shape, generator=g)
            if "norm" in name:
                value = 1 + 0.1 * value
            elif p.dim() == 2 and p.shape[0] == VOCAB and "embed" not in name:
                value = value * 0.5 / math.sqrt(p.shape[1])
            elif p.dim() == 2 and "embed" not in name:
                value = value * 1.5 / math.sqrt(p.shape[1])
            else:
                value = value * 0.2
            p.copy_(value)


def import_as_ddlm(their, config: dict, prefix: str, workdir: Path, name: str):
    """Their module's state dict written as a published folder, imported and loaded by ddlm."""
    folder = workdir / f"{name}-published"
    folder.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.detach().contiguous() for k, v in their.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    write_run(dit.import_dit(folder), workdir / f"{name}-run", overwrite=True)
    return load_for_inference(workdir / f"{name}-run", torch.device("cpu")), sorted(state)


def tokens(length: int, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 50257, (batch, length), generator=g)
    masked = torch.rand(batch, length, generator=g) < 0.5
    return x0, torch.where(masked, torch.full_like(x0, MASK), x0)


def subs(logits, zt):
    """SUBS as their diffusion.py writes it (mask logit -1e6, normalised, carry-over)."""
    logits = logits.double().clone()
    logits[..., MASK] += -1e6
    logits = logits - logits.logsumexp(-1, keepdim=True)
    unmasked = zt != MASK
    logits[unmasked] = -1e6
    logits[unmasked, zt[unmasked]] = 0
    return logits


def float64_logits(model, *args, **kwargs):
    """ddlm's logits with the whole pass in float64 (its forward rounds logits to float32, so the
    output layer is applied here): the yardstick that tells float32 rounding from a mismatch."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        h = m(*args, hidden=True, **kwargs)
    return F.linear(h, m.head.weight, m.head.bias)[..., :VOCAB]


def rounding_figures(theirs, ours, ours64, where=None) -> dict:
    """|ddlm - theirs| beside what float32 alone explains: each float32 pass against float64."""
    return {"logits": max_diff(ours[..., :VOCAB], theirs, where),
            "logits_ddlm_fp32_vs_fp64": max_diff(ours[..., :VOCAB], ours64, where),
            "logits_theirs_fp32_vs_ddlm_fp64": max_diff(theirs, ours64, where)}


def max_diff(a, b, where=None) -> float:
    d = (a.double() - b.double()).abs()
    return float((d if where is None else d[where]).max())


def compare_mdlm(their, loaded, length: int) -> dict:
    _, zt = tokens(length, 1)
    t = torch.full((zt.shape[0], 1), 0.5, dtype=torch.float64)
    with torch.no_grad():
        theirs = their(zt, torch.zeros(zt.shape[0]))  # time_conditioning false: their sigma is 0
        ours = loaded.model(zt, mask="bidirectional")
        log_x = loaded.method.log_x_theta(loaded.model, zt, t)
    ours64 = float64_logits(loaded.model, zt, mask="bidirectional")
    masked = zt == MASK
    return {**rounding_figures(theirs, ours, ours64),
            "subs_log_probs_at_masked": max_diff(log_x[..., :MASK], subs(theirs, zt)[..., :MASK], masked)}


def compare_bd3(their, loaded, length: int) -> dict:
    x0, zt = tokens(length, 2)
    block = loaded.method.block_size
    t = torch.full((zt.shape[0], length // block), 0.5, dtype=torch.float64)
    with torch.no_grad():
        theirs = their(torch.cat([zt, x0], 1), torch.zeros(zt.shape[0]))  # (B, L, V): the x_t half
        log_x = loaded.method.log_x_theta(loaded.model, zt, t, x0=x0)
        pass_args = dict(mask=loaded.method.training_mask(length, zt.device),
                         positions=torch.arange(length).repeat(2), logits_for=length)
        ours = loaded.model(torch.cat([zt, x0], 1), **pass_args)
    ours64 = float64_logits(loaded.model, torch.cat([zt, x0], 1), **pass_args)
    masked = zt == MASK
    return {**rounding_figures(theirs, ours, ours64),
            "subs_log_probs_at_masked": max_diff(log_x[..., :MASK], subs(theirs, zt)[..., :MASK], masked)}


def compare_sedd(their, loaded, length: int) -> dict:
    _, xt = tokens(length, 3)
    t = torch.tensor([[0.2], [0.9]], dtype=torch.float64)
    sigma = loaded.method.schedule.total_noise(t)[:, 0]
    off_diagonal = torch.ones(*xt.shape, VOCAB, dtype=torch.bool).scatter_(-1, xt[..., None], False)
    with torch.no_grad():
        scores = their(xt, sigma.float())  # scale_by_sigma, x_t's entry set to 0
        their.scale_by_sigma = False
        raw = their(xt, sigma.float())
        their.scale_by_sigma = True
        ours = loaded.model(xt, sigma=sigma.float(), mask="bidirectional")
        log_s = loaded.method.log_score(loaded.model, xt, t)
    ours64 = float64_logits(loaded.model, xt, sigma=sigma.float(), mask="bidirectional")
    return {**rounding_figures(raw, ours, ours64, off_diagonal),
            "log_scores_off_diagonal": max_diff(log_s[..., :VOCAB], scores, off_diagonal),
            "log_score_constant_expected": math.log(50258) - math.log(50257)}


def run(args) -> dict:
    torch.manual_seed(0)
    size = SIZES[args.size]
    results = {"size": {args.size: size}, "vocab": VOCAB, "dtype": "float32",
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        builders = {"mdlm": (lambda: mdlm_model(args.mdlm, size, work), compare_mdlm, args.mdlm),
                    "bd3": (lambda: bd3_model(args.bd3, size, work, args.block_size), compare_bd3, args.bd3),
                    "sedd": (lambda: sedd_model(args.sedd, size, work), compare_sedd, args.sedd)}
        for name, (build, compare, repo) in builders.items():
            if repo is None:
                continue
            their, config, prefix = build()
            randomise(their, seed=len(name))
            their.eval()
            loaded, keys = import_as_ddlm(their, config, prefix, work, name)
            figures = compare(their, loaded, size["length"])
            results["formats"][name] = {"repo_commit": head_commit(repo), "keys": len(keys), **figures}
            print(name, json.dumps(figures), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdlm", type=Path, help="kuleshov-group/mdlm (git dir or checkout)")
    parser.add_argument("--bd3", type=Path, help="kuleshov-group/bd3lms (git dir or checkout)")
    parser.add_argument("--sedd", type=Path, help="louaaron/Score-Entropy-Discrete-Diffusion (git dir or checkout)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    previous[args.size] = results
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
