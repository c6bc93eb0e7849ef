"""GPT-2 both ways: a random-weight transformers GPT2LMHeadModel imports into an `ar` run whose
logits, likelihood and tokenizer equal GPT-2's, and the run exports back to a folder that
AutoModelForCausalLM loads natively with the same logits."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ddlm.build import load_for_inference  # noqa: E402
from ddlm.cli import main  # noqa: E402
from ddlm.config import ModelConfig  # noqa: E402
from ddlm.interop.gpt2 import export_gpt2, tokenizer_files  # noqa: E402
from ddlm.interop.import_ import import_model  # noqa: E402
from ddlm.nn.transformer import Transformer  # noqa: E402

AUSTEN = Path(__file__).resolve().parents[1] / "ddlm" / "data" / "austen.txt.gz"


def gpt2_or_skip():
    from ddlm.data.tokenizers import build_tokenizer
    from ddlm.errors import DdlmError

    try:
        return build_tokenizer("gpt2")
    except DdlmError as err:
        pytest.skip(f"GPT-2's ranks are not installed: {err}")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    gpt2_or_skip()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=48)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms at 0 and 1: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def imported(gpt2_folder, tmp_path_factory):
    folder, _ = gpt2_folder
    out = tmp_path_factory.mktemp("imported") / "run"
    import_model(folder, out)
    return load_for_inference(out, torch.device("cpu"))


def test_imported_logits_equal_gpt2(gpt2_folder, imported):
    _, model = gpt2_folder
    tokens = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(tokens).logits
        ours = imported.model(tokens, mask="causal")
    assert ours.shape[-1] == 50259
    assert torch.allclose(ours[..., :50257], theirs, atol=1e-5, rtol=0)
    assert (ours[..., 50257:] <= -1e4).all()  # ddlm's mask and pad ids are never emitted


def test_imported_likelihood_equals_gpt2_loss(gpt2_folder, imported):
    """AR's exact NLL of x given BOS = <|endoftext|> is GPT-2's own mean loss on [eos, x]."""
    _, model = gpt2_folder
    x = torch.randint(0, 50256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = imported.method.nll_bound(imported.model, x)
        with_bos = torch.cat([torch.full((2, 1), 50256), x], dim=1)
        theirs = [model(row[None], labels=row[None]).loss.item() * x.shape[1] for row in with_bos]
    assert ours.exact
    assert torch.allclose(ours.nll, torch.tensor(theirs, dtype=torch.float64), rtol=1e-5)


def test_cached_sampling_runs_on_learned_positions(imported):
    gen = imported.method.sampler(imported.run.sample).generate(
        imported.model, 2, 12, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (2, 12) and int(gen.tokens.max()) < 50257


def test_tokenizer_ids_equal_transformers_gpt2_on_austen(tmp_path):
    """transformers' own BPE, built from the vocab.json and merges.txt ddlm writes, gives the ids of
    ddlm's tiktoken-based tokenizer on Austen: the merges reproduce GPT-2's."""
    tok = gpt2_or_skip()
    from ddlm.interop.gpt2 import write_tokenizer

    write_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = gzip.open(AUSTEN, "rt", encoding="utf-8").read()[20_000:32_000]
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf("Hello world")["input_ids"] == [15496, 995]


def test_merges_follow_rank_order():
    """A toy rank table: every merged token's line comes in rank order, split into lower ranks."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"], ranks[b"abc"], ranks[b"bc"], ranks[b"xabc"] = 256, 257, 258, 259
    _, merges = tokenizer_files(ranks)
    assert merges == ["a b", "ab c", "b c", "x abc"]


def test_export_loads_natively_with_equal_logits(imported, tmp_path):
    out = tmp_path / "hf"
    report = export_gpt2(imported, out)
    assert report["remote_code"] is False and not list(out.glob("*.py"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, imported.model(tokens, mask="causal")[..., :50257],
                              atol=1e-5, rtol=0)


def test_export_then_import_round_trips_weights(imported, tmp_path):
    export_gpt2(imported, tmp_path / "hf")
    import_model(tmp_path / "hf", tmp_path / "again")
    again = load_for_inference(tmp_path / "again", torch.device("cpu"))
    ours, theirs = imported.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_tied_model_state_dict_moves_and_loads():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=40, max_len=8, block="plain",
                      positions="learned", bias=True, tie_embeddings=True, output_vocab=38)
    model = Transformer(cfg)
    state = model.state_dict()
    assert "head.weight" not in state and "pos_embed.weight" in state
    other = Transformer(cfg)
    other.load_state_dict(state)
    assert other.head.weight is other.embed.weight and torch.equal(other.head.weight, model.embed.weight)
    moved = Transformer(cfg).to("meta")
    assert moved.head.weight is moved.embed.weight
    x = torch.randint(0, 38, (1, 8))
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.cat([x, x], 1))


@pytest.mark.parametrize("change, words", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"vocab_size": 1000}, "vocab_size"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_embd": "wide"}, "n_embd"),
])
def test_unsupported_config_is_one_line(gpt2_folder, tmp_path, capsys, change, words):
    folder, _ = gpt2_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text()) | change
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["import", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "run").exists()


def _copy_with_weights(folder: Path, dest: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("edit, words", [
    (lambda w: w.pop("transformer.h.1.mlp.c_fc.bias"), "h.1.mlp.c_fc.bias is missing"),
    (lambda w: w.__setitem__("transformer.h.0.extra", torch.zeros(2)), "unexpected tensor h.0.extra"),
    (lambda w: w.__setitem__("transformer.wpe.weight", torch.zeros(7, 64)), "wpe.weight has shape (7, 64)"),
])
def test_mismatched_weights_are_one_line(gpt2_folder, tmp_path, capsys, edit, words):
    folder, _ = gpt2_folder
    bad = _copy_with_weights(folder, tmp_path / "bad", edit)
    assert main(["import", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_pickle_weights_are_refused_unopened(gpt2_folder, tmp_path, capsys):
    folder, _ = gpt2_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle ddlm will ever open")
    assert main(["import", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickled" in err and "pytorch_model.bin" in err


def test_unknown_folder_and_existing_out_are_one_line(gpt2_folder, tmp_path, capsys):
    folder, _ = gpt2_folder
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert "not a model ddlm can import" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["import", str(folder), "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_import_then_eval(gpt2_folder, tmp_path, capsys):
    folder, _ = gpt2_folder
    assert main(["import", str(folder), "--out", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ar" and report["architecture"] == "gpt2" and report["seq_len"] == 48
    assert main(["eval", str(tmp_path / "run"), "--json", "--eval.max_batches=1", "--eval.batch_size=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(result["bpc"]) and result["method"] == "ar"


def test_cli_export_then_import_round_trip(gpt2_folder, tmp_path, capsys):
    folder, model = gpt2_folder
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf"), "--json"]) == 0
    capsys.readouterr()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(exported(tokens).logits, model(tokens).logits, atol=1e-5, rtol=0)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "again"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ar"
    assert main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 2  # exists: one line
    assert "--overwrite" in capsys.readouterr().err


def test_compare_row_imports_a_published_model_without_training(gpt2_folder, tmp_path, monkeypatch, capsys):
    """`import: SRC` in a recipe: the folder becomes runs/<row> once (no training), is scored and
    sampled like any row and judges another; a rerun reuses it."""
    folder, model = gpt2_folder
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: imported
base:
  data: {{seq_len: 16}}
  model: {{dim: 32, n_layers: 1, n_heads: 2}}
  train: {{steps: 2, batch_size: 2, eval_every: 0, threads: 1, progress: false}}
rows:
  - {{name: gpt2, import: "{folder}"}}
  - {{name: mdlm, method: mdlm}}
evaluate:
  likelihood: {{split: test, max_batches: 1, batch_size: 2}}
  generation: {{steps: [2], num: 2, length: 8, batch_size: 2, judges: [gpt2]}}
  conditional: {{judge: gpt2}}
""")
    out = tmp_path / "out"
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    gpt2_row = results["rows"][0]
    assert gpt2_row["name"] == "gpt2" and gpt2_row["seeds"][0]["train"] == {"steps": 0, "imported": str(folder)}
    assert gpt2_row["seeds"][0]["likelihood"]["exact"] and len(gpt2_row["seeds"]) == 1
    assert not (out / "runs" / "gpt2" / "metrics.jsonl").exists()  # imported, never trained
    judged = results["rows"][1]["seeds"][0]["generation"][0]["judges"]["gpt2"]
    assert judged["tokens"] > 0
    imported = load_for_inference(out / "runs" / "gpt2", torch.device("cpu"))
    tokens = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(imported.model(tokens, mask="causal")[..., :50257], model(tokens).logits, atol=1e-5)
    written = (out / "runs" / "gpt2" / "latest").stat().st_mtime_ns
    assert main(["compare", str(recipe), "--out", str(out), "--json"]) == 0
    assert (out / "runs" / "gpt2" / "latest").stat().st_mtime_ns == written


def test_import_rows_take_no_training_options():
    from ddlm.compare.recipe import parse_recipe
    from ddlm.errors import ConfigError

    for row in ({"name": "g", "import": "x", "method": "ar"}, {"name": "g", "import": "x", "seeds": 3},
                {"name": "g", "import": "x", "train": {"steps": 3}}):
        with pytest.raises(ConfigError) as err:
            parse_recipe({"name": "r", "rows": [row]}, "r.yaml")
        assert "\n" not in str(err.value)


def test_a_huggingface_hub_cache_folder_imports(gpt2_folder, tmp_path, capsys):
    """models--org--name/{refs/main, snapshots/<hash>/...}: the snapshot refs/main names."""
    import shutil

    folder, _ = gpt2_folder
    cache = tmp_path / "models--openai-community--gpt2"
    shutil.copytree(folder, cache / "snapshots" / "abc123")
    (cache / "snapshots" / "old").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123\n")
    assert main(["import", str(cache), "--out", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "gpt2"
    (cache / "refs" / "main").write_text("../../elsewhere")  # never followed out of snapshots/
    assert main(["import", str(cache), "--out", str(tmp_path / "run2")]) == 2
    assert "2 snapshots" in capsys.readouterr().err
