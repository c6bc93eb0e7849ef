"""Hostile inputs found by benchmarks/hostile.py (issue 26), each pinned by a test: files of the
wrong shape or nested past the recursion limit, metrics lines that are not metrics, results that
cannot be written, a run directory that cannot be written, a cache that is a file or lies, a device
that does not exist, a full disk while checkpointing, an --init that contradicts the tokenizer, a
corpus edited under a run, and YAML that expands without end. Each is one line `ddlm: error: ...`
(or a cache rebuilt), never a traceback, and nothing already written is lost."""
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from ddlm.checkpoint import write_manifest
from ddlm.cli import main
from ddlm.config import load_recipe, make_config
from ddlm.errors import ConfigError, DataError
from ddlm.train.loop import train

from test_defects import TINY, TINY_ARGS  # the same tiny run as the review's defects

DEEP = "[" * 200_000 + "]" * 200_000  # past any recursion limit


def tiny(**data):
    return make_config(base={**TINY, "data": {**TINY["data"], **data}})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDLM_ALLOW_UNVERIFIED", raising=False)
    monkeypatch.delenv("DDLM_DEVICE", raising=False)


@pytest.fixture
def run(tmp_path):
    train(tiny(), tmp_path / "run", quiet=True)
    return tmp_path / "run"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddlm: error: "), err
    return err


def ckpt_of(run):
    return run / "checkpoints" / "step_0000002"


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. JSON of the wrong shape or depth

def _manifest(run, change):
    path = ckpt_of(run) / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(change(manifest))


@pytest.mark.parametrize("change, words", [
    (lambda m: json.dumps({"files": list(m["files"])}), "lists no files"),
    (lambda m: json.dumps({"files": {name: 5 for name in m["files"]}}), "no size and checksum"),
    (lambda m: json.dumps([m]), "does not hold a JSON object"),
    (lambda m: DEEP, "nested too deeply"),
    (lambda m: '{"files": ' + DEEP + "}", "nested too deeply"),
], ids=["files-a-list", "entries-numbers", "a-list", "deep", "files-deep"])
def test_a_manifest_of_the_wrong_shape_is_one_line(run, capsys, change, words):
    _manifest(run, change)
    assert main(["sample", str(run), "--num", "1", "--length", "4"]) == 2
    assert words in one_line_error(capsys)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_checkpoint_json_nested_200k_deep_is_one_line(run, capsys, name):
    (ckpt_of(run) / name).write_text(DEEP)
    write_manifest(ckpt_of(run))
    assert main(["info", str(run)]) == 2
    assert name in one_line_error(capsys)


@pytest.mark.parametrize("content", [DEEP, "[1, 2]", '{"KEY": "fast"}', '{"KEY": {"choice": "fp64"}}', "\xff"],
                         ids=["deep", "a-list", "entry-a-string", "unknown-choice", "not-utf8"])
def test_a_corrupt_dtype_probe_is_measured_again(tmp_path, content):
    import torch

    from ddlm import runtime

    path = runtime.cache_dir() / "dtype_probe.json"
    key = runtime._probe_key(torch.device("cpu"))
    path.write_bytes(content.replace("KEY", key).encode("latin-1"))
    verdict = runtime.probe_dtype(torch.device("cpu"))
    assert verdict["choice"] in runtime.DTYPES
    assert json.loads(path.read_text())[key]["choice"] == verdict["choice"]  # the cache is whole again


# ------------------------------------------------------------------------- 2. metrics.jsonl

@pytest.mark.parametrize("line, words", [
    (b"[1, 2, 3]\n", "line 3 is not a JSON object"),
    (b'"a string"\n', "line 3 is not a JSON object"),
    (b'{"step": 3, "loss": 1.0, "note": "\xff\xfe"}\n', "line 3 is not UTF-8"),
    (b'{"step": 2, "split": "valid", "val_bpc": "fast"}\n', "line 3: val_bpc"),
    (b'{"step": "two", "loss": 1.0}\n', "line 3: step"),
    ('{"a": ' .encode() + DEEP.encode() + b"}\n", "line 3 is nested too deeply"),
], ids=["a-list", "a-string", "not-utf8", "string-val_bpc", "string-step", "deep"])
def test_metrics_lines_that_are_not_metrics_are_one_line(run, capsys, line, words):
    from ddlm.compare.runner import training_summary
    from ddlm.eval.plots import validation_curve

    metrics = run / "metrics.jsonl"
    words = words.replace("line 3", f"line {len(metrics.read_bytes().splitlines()) + 1}")
    with open(metrics, "ab") as f:
        f.write(line)
    before = snapshot(run)
    for read in (training_summary, validation_curve):
        with pytest.raises(DataError, match=words):
            read(run)
    assert main(["info", str(run)]) == 2
    assert words in one_line_error(capsys)
    assert main(["train", "--method", "ar", "--out", str(run), "--steps", "4", *TINY_ARGS]) == 2  # resume
    assert words in one_line_error(capsys)
    assert snapshot(run) == before  # nothing rewritten, nothing lost


def test_a_torn_last_metrics_line_is_still_skipped(run):
    from ddlm.eval.records import read_jsonl

    whole = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # what a kill mid-write leaves
    assert read_jsonl(run / "metrics.jsonl") == whole


# ------------------------------------------------------------------------ 3. eval --results

def test_eval_results_naming_a_directory_is_refused_before_evaluating(run, tmp_path, capsys, monkeypatch):
    import ddlm.commands.evaluate as eval_run

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking --results")

    monkeypatch.setattr(eval_run, "evaluate_checkpoint", never)
    monkeypatch.setattr(eval_run, "evaluate_generation", never)
    assert main(["eval", str(run), "--results", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys)
    assert main(["eval", str(run), "--generate", "--num", "1", "--results", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys)


def test_eval_results_on_a_full_disk_prints_the_result_and_says_so(run, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    assert main(["eval", str(run), "--eval.max_batches=1", "--json", "--results", "/dev/full"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["bpc"] > 0  # the evaluation's result is never lost
    assert len(err.strip().splitlines()) == 1 and "no space left on device" in err.lower(), err


def test_eval_results_that_cannot_be_written_leave_earlier_records_whole(run, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    assert main(["eval", str(run), "--eval.max_batches=1", "--results", str(results)]) == 0
    before = results.read_bytes()
    capsys.readouterr()

    def full(fd):  # the disk fills while the new record is written out
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ddlm.eval.records.os.fsync", full)
    assert main(["eval", str(run), "--eval.max_batches=1", "--json", "--results", str(results)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["bpc"] > 0 and "no space left on device" in err.lower()
    assert results.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "results.jsonl", "run"]


# ---------------------------------------------------------------- 4. a run directory read-only

def _make_read_only(path):
    """chmod for a user; root ignores modes, so there the directory is made immutable."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("as root, a read-only directory needs chattr +i")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_run_directory_is_one_line(run, capsys):
    before = snapshot(run)
    restore = _make_read_only(run)
    try:
        assert main(["train", "--method", "ar", "--out", str(run), "--steps", "4", *TINY_ARGS]) == 2
        assert "not writable" in one_line_error(capsys)
    finally:
        restore()
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


# ----------------------------------------------------------------------- 5. caches and devices

def test_a_file_as_ddlm_cache_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "a_file"))
    assert main(["train", "--method", "ar", "--out", str(tmp_path / "run"), "--steps", "1", *TINY_ARGS]) == 2
    assert "DDLM_CACHE" in one_line_error(capsys)
    assert (tmp_path / "a_file").read_text() == "x"


def _token_caches():
    from ddlm import runtime

    return sorted((runtime.cache_dir() / "tokens").glob("stream-*.npy"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "ids-past-the-vocabulary"])
def test_a_damaged_token_cache_is_rebuilt(run, damage):
    from ddlm.build import prepare_data
    from ddlm.build import load_for_inference

    loaded = load_for_inference(run)
    _, want = prepare_data(loaded.run, loaded.tokenizer)
    want = {k: np.array(v.tokens) for k, v in want.items()}
    for path in _token_caches():
        stream = np.load(path)
        if damage == "garbage":
            path.write_bytes(os.urandom(4096))
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:200])
        else:
            stream[::7] = loaded.tokenizer.vocab_size + 100  # poisoned: would index past the embedding
            np.save(path, stream)
    _, got = prepare_data(loaded.run, loaded.tokenizer)
    assert all(np.array_equal(np.array(got[k].tokens), want[k]) for k in want)
    assert all(np.load(p).max() < loaded.tokenizer.vocab_size for p in _token_caches())


@pytest.mark.parametrize("value", ["bogus", "cuda:99", "cpu:x"])
def test_an_unknown_ddlm_device_is_one_line(run, monkeypatch, capsys, value):
    monkeypatch.setenv("DDLM_DEVICE", value)
    assert main(["sample", str(run), "--num", "1", "--length", "4"]) == 2
    assert "DDLM_DEVICE" in one_line_error(capsys)


# ----------------------------------------------------------------- 6. a full disk while checkpointing

ENFORCE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _torch_save_on_a_full_disk(obj, f, *args, **kwargs):
    """What torch.save does when the disk fills (seen on a small tmpfs): given a path, torch's own
    error and nothing else; given a file object, torch's error raised while Python's OSError is
    handled (or that OSError itself: `_torch_save_raising_oserror`), depending on where it filled."""
    if isinstance(f, (str, os.PathLike)):
        raise RuntimeError(ENFORCE)
    f.write(b"PK\x03\x04")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError(ENFORCE)


def _torch_save_raising_oserror(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        raise RuntimeError(ENFORCE)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_on_a_full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer", ["trainer_state", "trainer_state-oserror", "safetensors"])
def test_a_full_disk_while_checkpointing_says_so_and_names_the_survivor(run, monkeypatch, capsys, writer):
    import ddlm.checkpoint as checkpoint

    if writer == "trainer_state":
        monkeypatch.setattr(checkpoint.torch, "save", _torch_save_on_a_full_disk)
    elif writer == "trainer_state-oserror":
        monkeypatch.setattr(checkpoint.torch, "save", _torch_save_raising_oserror)
    else:
        monkeypatch.setattr(checkpoint, "save_file", _safetensors_on_a_full_disk)
    assert main(["train", "--method", "ar", "--out", str(run), "--steps", "4", *TINY_ARGS]) == 2
    err = one_line_error(capsys)
    assert "no space left on device" in err and "checkpoints/step_0000002" in err and "enforce" not in err
    assert (run / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]


# --------------------------------------------------------------------- 7. what a run says it used

def test_init_from_a_byte_run_with_another_tokenizer_is_refused(tmp_path, capsys):
    byte_run = tmp_path / "byte"
    assert main(["train", "--method", "ar", "--tokenizer", "byte", "--out", str(byte_run), "--steps", "2",
                 *TINY_ARGS]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "ar", "--init", str(byte_run), "--tokenizer", "char",
                 "--out", str(tmp_path / "char"), "--steps", "2", *TINY_ARGS]) == 2
    err = one_line_error(capsys)
    assert "'byte'" in err and "'char'" in err
    assert not (tmp_path / "char" / "latest").exists()
    assert main(["train", "--method", "ar", "--init", str(byte_run), "--out", str(tmp_path / "same"),
                 "--steps", "2", *TINY_ARGS]) == 0  # the init's own tokenizer is what it inherits


def test_a_corpus_edited_between_a_run_and_its_resumption_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    out = tmp_path / "run"
    args = ["train", "--method", "ar", "--data", str(corpus), "--out", str(out), *TINY_ARGS]
    assert main([*args, "--steps", "2"]) == 0
    corpus.write_text("a lazy dog sleeps under the quick brown fox\n" * 200)  # same size, other text
    before = snapshot(out)
    assert main([*args, "--steps", "4"]) == 2
    err = one_line_error(capsys)
    assert str(corpus) in err and "changed" in err
    assert snapshot(out) == before
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)  # put back: resumes
    assert main([*args, "--steps", "4"]) == 0


# ------------------------------------------------------------------------------ 8. YAML recipes

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, words", [
    (BOMB, "more than"),
    ("base: &a {x: [*a]}\n", "refers to itself"),
    ("base: " + "[" * 200_000 + "]" * 200_000 + "\n", "nested too deeply"),
], ids=["alias-bomb", "recursive-alias", "deep"])
def test_a_recipe_that_expands_without_end_is_one_line(tmp_path, capsys, text, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_recipe(recipe)
    for command in (["compare", str(recipe), "--out", str(tmp_path / "cmp")],
                    ["train", "--config", str(recipe), "--out", str(tmp_path / "t")]):
        assert main(command) == 2
        assert words in one_line_error(capsys)
    assert not (tmp_path / "t").exists()


def test_the_recipes_of_the_repository_still_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes and all(isinstance(load_recipe(r), dict) for r in recipes)

