"""`ddlm data prepare`: the same rows as the in-memory path, byte-identical for any number of
workers, checksummed, atomic, one-line errors, and a training run reading the prepared directory."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from ddlm.cli import main
from ddlm.config import make_config
from ddlm.data import build_datasets, build_tokenizer, encode_documents, load_corpus
from ddlm.data.prepare import prepare_corpus
from ddlm.data.prepared import LazyRows, open_prepared, prepared_datasets
from ddlm.data.tokenizers import CharTokenizer, fingerprint
from ddlm.errors import ConfigError, DataError

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def austen():
    return load_corpus("austen")


@pytest.fixture(scope="module")
def char():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Austen with the char tokenizer, wrap and pad, small shards (rows straddle shard files)."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for packing in ("wrap", "pad"):
        out[packing] = root / packing
        prepare_corpus("austen", "char", out[packing], packing=packing, shard_tokens=300_000, **QUIET)
    return out


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _same_rows(got, want):
    assert got.tokens.shape == want.tokens.shape
    assert np.array_equal(got.tokens[:], want.tokens)
    assert (got.valid is None) == (want.valid is None)
    if want.valid is not None:
        assert np.array_equal(got.valid[:], want.valid)
    assert got.chars_per_token == want.chars_per_token


@pytest.mark.parametrize("packing,seq_len", [("wrap", 64), ("wrap", 257), ("pad", 48), ("pad", 400)])
def test_rows_equal_the_in_memory_path(prepared, austen, char, packing, seq_len):
    """Same corpus, tokenizer, L and packing: exactly the rows, masks and chars/token of build_datasets;
    one prepared DIR serves any L."""
    want = build_datasets(austen, char, seq_len=seq_len, packing=packing)
    got = open_prepared(prepared[packing]).datasets(seq_len)
    for split in ("train", "valid", "test"):
        _same_rows(got[split], want[split])


def test_index_describes_the_corpus(prepared, char):
    index = json.loads((prepared["wrap"] / "index.json").read_text())
    assert index["format"] == "ddlm-prepared" and index["source"] == "austen" and index["dtype"] == "uint16"
    assert index["tokenizer"] == char.to_dict() and index["tokenizer_fingerprint"] == fingerprint(char)
    train = index["splits"]["train"]
    assert len(train["shards"]) > 1 and sum(s["tokens"] for s in train["shards"]) == train["tokens"]
    assert train["documents"] == 180 and len(train["offsets"]) == 181 and train["offsets"][-1] == train["tokens"]
    stream = open_prepared(prepared["wrap"]).stream("train")
    starts = np.asarray(train["offsets"][1:-1])
    assert (stream.take(starts - 1) == char.bos_id).all()  # every document ends with EOS
    lines = json.loads((prepared["pad"] / "index.json").read_text())["splits"]["valid"]
    assert isinstance(lines["offsets"], dict) and lines["offsets"]["count"] == lines["documents"] + 1
    assert (prepared["pad"] / lines["offsets"]["file"]).is_file()


def test_lazy_rows_index_like_an_array(prepared, austen, char):
    ds = open_prepared(prepared["pad"]).dataset("valid", 40)
    want = build_datasets(austen, char, seq_len=40, packing="pad")["valid"]
    rows = np.array([5, 0, len(want) - 1, 5])
    assert isinstance(ds.tokens, LazyRows) and ds.tokens.ndim == 2 and len(ds) == len(want)
    assert np.array_equal(ds.tokens[rows], want.tokens[rows])
    assert np.array_equal(ds.tokens[rows, :7], want.tokens[rows, :7])
    assert np.array_equal(ds.tokens[-1], want.tokens[-1]) and np.array_equal(ds.tokens[2:9:3], want.tokens[2:9:3])
    assert np.array_equal(ds.valid[[1, 2]], want.valid[[1, 2]]) and ds.valid[[1]].dtype == bool
    assert np.array_equal(np.asarray(ds.tokens), want.tokens)
    assert ds.tokens[np.array([], dtype=np.int64)].shape == (0, 40)
    copy = pickle.loads(pickle.dumps(ds.tokens))  # a copy maps the shards again; it never carries them
    assert len(pickle.dumps(ds.tokens)) < 20_000 and np.array_equal(copy[rows], want.tokens[rows])
    with pytest.raises(IndexError):
        ds.tokens[len(want)]


def test_aligned_wrap_starts_documents_on_block_boundaries(tmp_path, prepared, char):
    out = tmp_path / "aligned"
    prepare_corpus("austen", "char", out, align=16, **QUIET)
    corpus = open_prepared(out)
    plain = open_prepared(prepared["wrap"])
    for split in ("train", "test"):
        offsets = corpus.offsets(split)[:-1]
        assert (offsets % 16 == 0).all()
        stream = corpus.stream(split).take(np.arange(len(corpus.stream(split))))
        unpadded = plain.stream(split).take(np.arange(len(plain.stream(split))))
        assert np.array_equal(stream[stream != char.pad_id], unpadded)
        ds = corpus.dataset(split, 64)
        assert np.array_equal(ds.valid[:], ds.tokens[:] != char.pad_id) and not ds.valid[:].all()
        assert ds.chars_per_token == plain.chars_per_token(split)
    with pytest.raises(ConfigError, match="multiple of it"):
        corpus.dataset("train", 40)


def _text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "Caf\u00e9", "na\u00efve", "rain,", "\u65e5\u672c", "it's", "I'LL", "x1234", "--", "\U0001f600",
             "and", "Elizabeth", "said:", "\t"]
    lines = []
    for i in range(n_lines):
        lines.append(" ".join(rng.choice(words, size=int(rng.integers(0, 14)))))
        if i % 17 == 3:
            lines.append("")
    return "\r\n".join(lines[: n_lines // 2]) + "\n" + "\n".join(lines[n_lines // 2:]) + "\n"


def test_workers_give_byte_identical_files(tmp_path):
    """1 and 2 workers, many chunks, several shards, both packings: the same bytes, index included."""
    source = tmp_path / "corpus.txt"
    source.write_text(_text(3000), encoding="utf-8")
    for packing in ("wrap", "pad"):
        one, two = tmp_path / f"one-{packing}", tmp_path / f"two-{packing}"
        opts = dict(packing=packing, shard_tokens=20_000, chunk_chars=2_000, **QUIET)
        prepare_corpus(str(source), "byte", one, workers=1, **opts)
        report = prepare_corpus(str(source), "byte", two, workers=2, **opts)
        assert report["workers"] == 2 and report["splits"]["train"]["shards"] > 1
        assert _files(one) == _files(two)


@pytest.mark.parametrize("content", [
    _text(400, seed=1),                              # CRLF and LF lines, blank lines, unicode
    "\ufeff" + _text(60, seed=2),                    # a byte-order mark
    "one long line without any newline " * 40,       # cut mid-line
    "a\n" * 5 + "b" * 300 + "\n" + "c\n" * 5,         # no line end near the 90% cut
])
@pytest.mark.parametrize("packing", ["wrap", "pad"])
def test_text_files_split_as_load_corpus_does(tmp_path, content, packing):
    source = tmp_path / "f.txt"
    source.write_bytes(content.encode("utf-8"))
    byte = build_tokenizer("byte")
    prepare_corpus(str(source), byte, tmp_path / "p", packing=packing, chunk_chars=50, **QUIET)
    want = build_datasets(load_corpus(str(source)), byte, seq_len=8, packing=packing)
    got = open_prepared(tmp_path / "p").datasets(8)
    for split in ("train", "valid", "test"):
        _same_rows(got[split], want[split])


def test_text8_split_and_char_chunks(tmp_path, austen, char):
    text = char.normalize(austen.test[0] + austen.valid[0])
    source = tmp_path / "text8"
    source.write_text(text)
    prepare_corpus(f"text8:{source}", "char", tmp_path / "p", chunk_chars=300, **QUIET)
    corpus = load_corpus(f"text8:{source}")
    got = open_prepared(tmp_path / "p")
    for split in ("train", "valid", "test"):
        stream = got.stream(split)
        assert np.array_equal(stream.take(np.arange(len(stream))), encode_documents(char, corpus.split(split)))
    with pytest.raises(DataError, match="not found"):
        prepare_corpus(f"text8:{tmp_path / 'none'}", "char", tmp_path / "q", **QUIET)


def test_hf_dataset_streams_like_load_corpus(tmp_path, char):
    datasets = pytest.importorskip("datasets", reason="hf: sources need the 'datasets' package")
    rows = [f"Row {i} of the train split." if i % 7 else None for i in range(120)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows, "id": list(range(120))}),
                               "test": datasets.Dataset.from_dict({"text": ["held out one", "held out two"]})})
    dd.save_to_disk(str(tmp_path / "hf"))
    for packing in ("wrap", "pad"):
        out = tmp_path / f"p-{packing}"
        prepare_corpus(f"hf:{tmp_path / 'hf'}", "char", out, packing=packing, workers=2, **QUIET)
        want = build_datasets(load_corpus(f"hf:{tmp_path / 'hf'}"), char, seq_len=16, packing=packing)
        got = open_prepared(out).datasets(16)
        for split in ("train", "valid", "test"):
            _same_rows(got[split], want[split])


def test_bpe_trains_on_the_streamed_train_split(tmp_path):
    source = tmp_path / "f.txt"
    source.write_text(_text(600, seed=3), encoding="utf-8")
    report = prepare_corpus(str(source), "bpe", tmp_path / "p", bpe_vocab_size=300, **QUIET)
    corpus = load_corpus(str(source))
    in_memory = build_tokenizer("bpe", "\n".join(corpus.train), bpe_vocab_size=300)
    prepared = open_prepared(tmp_path / "p")
    assert report["tokenizer"] == "bpe" and prepared.fingerprint == fingerprint(in_memory)


def test_modified_shard_is_detected(tmp_path, prepared):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared["wrap"], copy)
    open_prepared(copy)
    shard = copy / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train_00001.bin' does not match its sha256") as err:
        open_prepared(copy)
    assert "\n" not in str(err.value)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train_00001.bin' holds"):
        open_prepared(copy)
    shard.unlink()
    with pytest.raises(DataError, match="train_00001.bin' named in index.json is missing"):
        open_prepared(copy)
    (copy / "index.json").write_text("{}")
    with pytest.raises(DataError, match="not a ddlm-prepared index"):
        open_prepared(copy)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_prepare_leaves_no_directory(tmp_path, monkeypatch, workers):
    """A tokenizer failing mid-way (in a worker process too): no DIR, no temporary directory; a
    leftover of a killed prepare is removed by the next one."""
    source = tmp_path / "f.txt"
    source.write_text("alpha beta gamma\n" * 2000 + "delta POISON epsilon\n" + "zeta eta\n" * 2000)
    original = CharTokenizer.encode

    def encode(self, text):
        if "poison" in text:
            raise Boom("tokenizer failed")
        return original(self, text)

    monkeypatch.setattr(CharTokenizer, "encode", encode)
    out = tmp_path / "out"
    with pytest.raises(Boom):
        prepare_corpus(str(source), "char", out, workers=workers, chunk_chars=1000, shard_tokens=5000, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    monkeypatch.undo()
    dead = tmp_path / ".out.prepare-999999999"
    dead.mkdir()
    (dead / "train_00000.bin").write_bytes(b"xx")
    prepare_corpus(str(source), "char", out, workers=workers, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "out"]


def _error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddlm: error: "), err
    return lines[0]


def test_cli_bad_inputs(tmp_path, capsys):
    out = ["--out", str(tmp_path / "p")]
    assert "not found" in _error(["data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", "char", *out],
                                 capsys)
    assert "unknown tokenizer 'wordpiece'" in _error(["data", "prepare", "austen", "--tokenizer", "wordpiece",
                                                      *out], capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--out",
                                  str(tmp_path / "file")], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "--overwrite" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--out",
                                    str(tmp_path / "full")], capsys)
    assert "refusing" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--overwrite", "--out",
                                 str(tmp_path / "full")], capsys)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert "--workers" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--workers", "0", *out],
                                 capsys)
    assert "packing" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--packing", "zip", *out],
                               capsys)
    assert "needs SOURCE" in _error(["data", "prepare", "--tokenizer", "char", *out], capsys)
    assert "invalid choice" in _error(["data", "unpack", "austen"], capsys)
    (tmp_path / "empty.txt").write_text(" \n\n")
    assert "empty" in _error(["data", "prepare", str(tmp_path / "empty.txt"), "--tokenizer", "char", *out], capsys)
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 10)
    assert "not a text file" in _error(["data", "prepare", str(tmp_path / "bin.txt"), "--tokenizer", "byte", *out],
                                       capsys)
    assert "too small" in _error(["data", "prepare", "austen", "--tokenizer", "char", "--seq-len", "300000",
                                  "--json", *out], capsys)
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))


def test_cli_prepare_and_overwrite(tmp_path, capsys):
    source = tmp_path / "f.txt"
    source.write_text(_text(200))
    args = ["data", "prepare", str(source), "--tokenizer", "byte", "--out", str(tmp_path / "p"), "--workers", "1"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokenizer"] == "byte" and report["splits"]["train"]["tokens"] > 0
    assert "--overwrite" in _error(args, capsys)
    assert main([*args, "--overwrite", "--packing", "pad"]) == 0
    assert "prepared:" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "index.json").read_text())["packing"] == "pad"


TINY = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "ckpt_every": 0,
                  "progress": False, "dtype": "fp32", "threads": 1}}


def test_training_and_evaluation_read_the_prepared_directory(tmp_path, prepared, capsys):
    from ddlm.train.loop import train

    run = make_config(base={**TINY, "method": "mdlm",
                            "data": {"corpus": f"prepared:{prepared['wrap']}", "seq_len": 32}})
    result = train(run, tmp_path / "run", quiet=True)
    assert result.step == 3 and not result.interrupted
    code = main(["eval", str(tmp_path / "run"), "--json", "--eval.max_batches=2"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["bpc"] > 0
    bad = make_config(base={**TINY, "method": "ar", "data": {"corpus": str(prepared["wrap"]), "tokenizer": "byte"}})
    with pytest.raises(ConfigError, match="prepared with the char tokenizer; set --data.tokenizer=char"):
        train(bad, tmp_path / "bad", quiet=True)
    pad = make_config(base={**TINY, "method": "ar", "data": {"corpus": str(prepared["wrap"]), "packing": "pad"}})
    with pytest.raises(ConfigError, match="--data.packing=wrap"):
        train(pad, tmp_path / "bad2", quiet=True)


def test_a_checkpoints_other_tokenizer_is_refused(prepared):
    data = make_config(base={"data": {"corpus": f"prepared:{prepared['wrap']}"}}).data
    tok, datasets = prepared_datasets(prepared["wrap"], data)
    assert tok.name == "char" and set(datasets) == {"train", "valid", "test"}
    other = build_tokenizer("bpe", "some text to learn from " * 50, bpe_vocab_size=300)
    with pytest.raises(DataError, match="is not the one"):
        prepared_datasets(prepared["wrap"], data, other)
    with pytest.raises(DataError, match="holds tokens, not text"):
        load_corpus(f"prepared:{prepared['wrap']}")
    with pytest.raises(DataError, match="not found"):
        open_prepared(prepared["wrap"].parent / "nothing")
