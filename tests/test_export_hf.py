"""`ddlm export DIR --to hf OUT`: every exportable method, offline, against ddlm itself.

Each run is a tiny model of its method (2 layers, d=32, L=16, char tokenizer) written as an ordinary
run directory, with every weight perturbed so that no zero-initialised gate or output layer hides a
wrong mapping. Proven here: transformers' `from_pretrained` gives ddlm's logits and the method's
log-probabilities to 1e-5; export -> import gives the same weights bit for bit and the same BPC;
`generate` with a seed draws the tokens `ddlm sample` draws; the tokenizer encodes as ddlm's."""
import dataclasses
import json

import pytest
import torch

from ddlm.build import load_for_inference
from ddlm.checkpoint import load_checkpoint, save_checkpoint
from ddlm.config import ModelConfig
from ddlm.errors import DdlmError
from ddlm.commands.evaluate import evaluate_checkpoint
from ddlm.interop.export import detect_export, export_hf, import_export
from ddlm.interop.rundir import write_run
from ddlm.commands.sample import sample_checkpoint

transformers = pytest.importorskip("transformers")

CASES = {  # name: (method, model options, method options)
    "ar": ("ar", {}, {}),
    "ar_gated": ("ar", {"block": "gated"}, {}),
    "mdlm": ("mdlm", {}, {}),
    "mdlm_timed": ("mdlm", {}, {"time_conditioning": True, "schedule": "cosine"}),
    "sedd": ("sedd", {}, {}),
    "sedd_uniform": ("sedd", {}, {"graph": "uniform", "schedule": "geometric"}),
    "bd3": ("bd3", {}, {"block_size": 4}),
}
if "positions" in {f.name for f in dataclasses.fields(ModelConfig)}:  # GPT-2's block (ddlm/interop/gpt2.py)
    CASES["ar_gpt2"] = ("ar", {"positions": "learned", "bias": True, "tie_embeddings": True}, {})
SEQ = 16
TOL = 1e-5
PERTURB = 0.05  # every weight moved by N(0, PERTURB^2): gates open, outputs far from one-hot


def tiny_run_dir(path, method: str, model: dict, options: dict):
    """A run directory holding one checkpoint of `method` with every weight perturbed (N(0, PERTURB^2)
    added), built as the trainer builds it (conftest.tiny_built, with the method's options)."""
    from ddlm.build import build_method, complete_model_config
    from ddlm.config import make_config
    from ddlm.data import build_tokenizer

    run = make_config(base={"method": method, method: options, "data": {"seq_len": SEQ},
                            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, **model}})
    tokenizer = build_tokenizer(run.data.tokenizer)
    run = complete_model_config(run, build_method(run, tokenizer), tokenizer.vocab_size)
    torch.manual_seed(0)
    network = build_method(run, tokenizer).build_model(run.model)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(PERTURB * torch.randn_like(p))
    save_checkpoint(path, 1, config=run, tokenizer_dict=tokenizer.to_dict(), weights=network.state_dict(),
                    trainer_state=None)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (run directory, export folder), made once for the module."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (method, model, options) in CASES.items():
        run = tiny_run_dir(root / f"run_{name}", method, model, options)
        export_hf(run, root / f"hf_{name}")
        out[name] = (run, root / f"hf_{name}")
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def from_pretrained(folder, method: str):
    auto = transformers.AutoModelForCausalLM if method == "ar" else transformers.AutoModelForMaskedLM
    return auto.from_pretrained(folder, trust_remote_code=True).eval()


def assert_equal_logits(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Equal to TOL where finite, and -inf at the same places; returns the largest difference."""
    finite = torch.isfinite(ours)
    assert torch.equal(finite, torch.isfinite(theirs))
    diff = (ours[finite].double() - theirs[finite].double()).abs().max().item()
    assert diff <= TOL, diff
    return diff


# ------------------------------------------------------------------------------ logits

@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_gives_ddlms_logits(exported, name):
    run_dir, folder = exported[name]
    loaded = load_for_inference(run_dir, torch.device("cpu"))
    method, model = loaded.method, loaded.model
    hf = from_pretrained(folder, loaded.run.method)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 27, (4, SEQ), generator=gen)
    with torch.no_grad():
        if loaded.run.method == "ar":
            x[:, 0] = loaded.tokenizer.bos_id
            assert_equal_logits(method.logits(model, x), hf(x).logits)
            return
        t = torch.rand(4, dtype=torch.float64, generator=gen).clamp_min(0.05)
        if loaded.run.method == "sedd":
            zt = method.graph.corrupt(x, method.schedule.total_noise(t)[:, None].expand(x.shape), gen)
            ours = method.log_score(model, zt, t[:, None], dtype=torch.float32)
            out = hf(zt, t=t)
        elif loaded.run.method == "bd3":  # one time per block, x_t (+) x_0 as in training and the bound
            t = torch.rand(4, SEQ // 4, dtype=torch.float64, generator=gen)
            zt = method.corrupt(x, t.repeat_interleave(4, dim=1), gen)
            ours = method.log_x_theta(model, zt, t.repeat_interleave(4, dim=1), x0=x)
            out = hf(zt, t=t, clean_ids=x)
        else:
            zt = method.corrupt(x, t[:, None], gen)
            ours = method.log_x_theta(model, zt, t[:, None])
            out = hf(zt, t=t)
        assert (zt != x).any() and (zt == x).any()  # some positions noised, some clean
        sigma = method.schedule.total_noise(t).float() if method.time_conditioned else None
        if loaded.run.method != "bd3":
            assert_equal_logits(model(zt, sigma=sigma, mask="bidirectional"), out.logits)
        assert_equal_logits(ours, out.log_probs)


@pytest.mark.parametrize("name,architecture", [(n, a) for n, a in (("ar", "GPTNeoXForCausalLM"),
                                                                   ("ar_gpt2", "GPT2LMHeadModel")) if n in CASES])
def test_plain_ar_is_a_native_architecture(exported, name, architecture):
    """No remote code: config.json names a transformers architecture and the folder holds no Python."""
    _, folder = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    assert not list(folder.glob("*.py")) and not list(folder.glob("*.bin"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # trust_remote_code not needed
    assert type(model).__name__ == architecture
    _, folder = exported["mdlm"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_ddlm.DdlmForMaskedLM"


# ------------------------------------------------------------------------------ import, eval, fine-tune

@pytest.mark.parametrize("name", [n for n in ("ar", "ar_gated", "ar_gpt2", "mdlm", "sedd", "bd3") if n in CASES])
def test_export_import_gives_the_same_weights_and_bpc(exported, name, tmp_path):
    run_dir, folder = exported[name]
    assert detect_export(folder) and not detect_export(run_dir)
    write_run(import_export(folder), tmp_path / "back")
    before, after = load_checkpoint(run_dir), load_checkpoint(tmp_path / "back")
    assert after.config.to_dict() == before.config.to_dict()
    assert before.weights.keys() == after.weights.keys()
    assert all(torch.equal(before.weights[k], after.weights[k]) for k in before.weights)
    overrides = ["--eval.max_batches=2", "--eval.batch_size=4"]
    a = evaluate_checkpoint(run_dir, split="test", overrides=overrides)
    b = evaluate_checkpoint(tmp_path / "back", split="test", overrides=overrides)
    assert a["bpc"] == b["bpc"] and a["tokens"] == b["tokens"]


def test_an_imported_export_fine_tunes(exported, tmp_path):
    from ddlm.config import make_config
    from ddlm.train.loop import train

    _, folder = exported["mdlm"]
    write_run(import_export(folder), tmp_path / "back")
    run = make_config(base={"method": "mdlm", "train": {"init": str(tmp_path / "back"), "steps": 2, "batch_size": 2,
                                                         "warmup_steps": 1, "eval_every": 0, "progress": False,
                                                         "dtype": "fp32", "threads": 1, "ema": 0.0},
                            "model": {"dim": 32, "n_layers": 2, "n_heads": 2}, "data": {"seq_len": SEQ}})
    result = train(run, tmp_path / "tuned", quiet=True)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))


# ------------------------------------------------------------------------------ generate

GENERATE = [  # (case, sampling options, prompt)
    ("ar_gated", {"top_p": 0.9}, "the "),
    ("mdlm", {"steps": 8, "top_p": 0.9}, None),
    ("mdlm", {"steps": 6, "sampler": "first_hitting"}, "it is"),
    ("mdlm_timed", {"steps": 8, "temperature": 0.8}, None),
    ("sedd", {"steps": 8}, "a "),
    ("sedd_uniform", {"steps": 8, "sampler": "euler"}, None),
    ("bd3", {"steps": 4, "top_p": 0.9}, "she "),
]


@pytest.mark.parametrize("name,options,prompt", GENERATE)
def test_generate_with_a_seed_equals_ddlm_sample(exported, name, options, prompt):
    run_dir, folder = exported[name]
    common = {"num": 3, "length": 10, "seed": 7, "batch_size": 2, **options}
    ours = sample_checkpoint(run_dir, prompt=prompt, options=common)["tokens"]
    loaded = load_for_inference(run_dir, torch.device("cpu"))
    hf = from_pretrained(folder, loaded.run.method)
    ids = None if prompt is None else torch.tensor([loaded.tokenizer.encode(prompt)])
    theirs = hf.generate(ids, num_samples=3, **{k: v for k, v in common.items() if k != "num"})
    assert theirs.tolist() == ours
    other = hf.generate(ids, num_samples=3, **{**{k: v for k, v in common.items() if k != "num"}, "seed": 8})
    assert other.tolist() != ours  # the seed matters


# ------------------------------------------------------------------------------ tokenizer

def test_the_tokenizer_encodes_as_ddlm_with_its_mask_token(exported):
    run_dir, folder = exported["mdlm"]
    ddlm_tok = load_for_inference(run_dir, torch.device("cpu")).tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "It is a truth universally acknowledged, that a single man -- 42 <|mask|> IN possession!"
    assert tok(text, add_special_tokens=False)["input_ids"] == ddlm_tok.encode(text)
    assert tok.mask_token_id == ddlm_tok.mask_id and tok.pad_token_id == ddlm_tok.pad_id
    assert tok.bos_token_id == ddlm_tok.bos_id
    assert tok.decode(ddlm_tok.encode("a truth universally")) == "a truth universally"


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2", "cl100k"])
def test_every_tokenizer_writes_as_tokenizers_json(kind, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from ddlm.data.tokenizers import build_tokenizer
    from ddlm.interop.export import backend_tokenizer

    train = "the quick brown fox jumps over the lazy dog, naïve café 東京\n" * 50
    try:
        ddlm_tok = build_tokenizer(kind, train, bpe_vocab_size=300)
    except DdlmError as err:  # gpt2 / cl100k ranks not installed
        pytest.skip(str(err))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend_tokenizer(ddlm_tok), split_special_tokens=True)
    for text in ["naïve café 東京 fox\n\tdog", "<|mask|> <|endoftext|> spelled out", " leading space",
                 "It's 1234567 DON'T   stop\n\n  now", "tabs\t\tand  trailing  "]:
        assert fast(text, add_special_tokens=False)["input_ids"] == ddlm_tok.encode(text)
        assert fast.decode(ddlm_tok.encode(text)) == text


# ------------------------------------------------------------------------------ bad input

def test_bad_input_is_one_line(exported, tmp_path):
    run_dir, folder = exported["mdlm"]
    cases = [
        lambda: export_hf(tmp_path / "missing", tmp_path / "x"),  # not a run directory
        lambda: export_hf(run_dir, folder),  # the target exists, no --overwrite
        lambda: export_hf(run_dir, run_dir, overwrite=True),  # --overwrite over something not an export
    ]
    for case in cases:
        with pytest.raises(DdlmError) as err:
            case()
        assert "\n" not in str(err.value)
    export_hf(run_dir, folder, overwrite=True)  # over an earlier export: allowed
    assert detect_export(folder)
