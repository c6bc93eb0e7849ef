"""The papers' tokenizers: GPT-2 BPE (tiktoken, offline ranks from openai-whisper) and BERT's
uncased WordPiece (a vocab file given by path), their round trips, and prepared corpora with them."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from ddlm.data import build_datasets, build_tokenizer, fingerprint, load_corpus, tokenizer_from_dict
from ddlm.data import tokenizers as tokenizers_module
from ddlm.data.prepare import prepare_corpus
from ddlm.data.prepared import open_prepared
from ddlm.errors import ConfigError, DataError

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base / GPT-2


def _gpt2_or_skip():
    try:
        return build_tokenizer("gpt2")
    except ConfigError as err:
        pytest.skip(f"GPT-2 ranks not installed (pip install --no-deps openai-whisper): {err}")


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2_or_skip()


# --- GPT-2 ------------------------------------------------------------------------------------


def test_gpt2_known_ids_and_specials(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("<|endoftext|>") != [50256]  # specials are never encoded from text
    assert (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.mask_id, gpt2.pad_id) == (50259, 50256, 50256,
                                                                                      50257, 50258)
    text = "Héllo, wörld! 😀 it's   12345\n\n  x"
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text and max(ids) < 50256
    assert gpt2.decode([gpt2.bos_id, *ids[:2], gpt2.mask_id, gpt2.pad_id]) == gpt2.decode(ids[:2]) + "<mask>"


def test_gpt2_round_trip_by_ranks_hash(gpt2, tmp_path, monkeypatch):
    d = gpt2.to_dict()
    assert d == {"name": "gpt2", "vocab_size": 50259, "ranks_sha256": GPT2_RANKS_SHA256}
    again = tokenizer_from_dict(json.loads(json.dumps(d)))
    assert fingerprint(again) == fingerprint(gpt2) and again.encode("Hello world") == [15496, 995]
    copy = tmp_path / "gpt2.tiktoken"
    shutil.copy(gpt2.ranks_path, copy)
    monkeypatch.setenv("DDLM_GPT2_RANKS", str(copy))
    assert build_tokenizer("gpt2").ranks_path == copy
    lines = copy.read_bytes().splitlines()
    copy.write_bytes(b"\n".join([lines[1].split()[0] + b" 0", lines[0].split()[0] + b" 1", *lines[2:]]))
    with pytest.raises(DataError, match="ranks of sha256"):
        tokenizer_from_dict(d)  # another ranks file than the checkpoint's


def test_gpt2_missing_ranks_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("DDLM_GPT2_RANKS", str(tmp_path / "none.tiktoken"))
    with pytest.raises(ConfigError, match="is not a file"):
        build_tokenizer("gpt2")
    monkeypatch.delenv("DDLM_GPT2_RANKS")
    real = importlib.util.find_spec
    monkeypatch.setattr(tokenizers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "whisper" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        build_tokenizer("gpt2")
    message = str(err.value)
    assert "gpt2.tiktoken" in message and "pip install --no-deps openai-whisper" in message and "\n" not in message


def test_gpt2_prepared_stream_equals_whole_text_encoding(gpt2, tmp_path):
    """Chunks cut between a letter and ' letter' split no GPT-2 pre-token: the prepared stream of
    each split is the encoding of its whole text, and the rows match the in-memory path."""
    corpus = load_corpus("austen")
    small = type(corpus)("small", corpus.train[:3], corpus.valid[:1], corpus.test[:1])
    prepare_corpus(small, gpt2, tmp_path / "p", chunk_chars=500, workers=2, progress=False)
    prepared = open_prepared(tmp_path / "p")
    assert prepared.index["dtype"] == "uint16"
    stream = prepared.stream("valid")
    assert stream.take(np.arange(len(stream))).tolist() == [*gpt2.encode(small.valid[0]), gpt2.eos_id]
    want = build_datasets(small, gpt2, seq_len=128)
    got = prepared.datasets(128)
    for split in ("train", "valid", "test"):
        assert np.array_equal(got[split].tokens[:], want[split].tokens)
        assert got[split].chars_per_token == want[split].chars_per_token


# --- BERT WordPiece ----------------------------------------------------------------------------

WORDS = ("the a an and of to in is was it that he she they i you we for on with as his her at by "
         "play run jump walk talk read writ sing think look go come make take say see know want "
         "cafe naive resume elizabeth darcy bennet mr mrs miss sister letter house morning evening "
         "day night time man woman lady family friend heart mind world hello").split()
WORDS += ("about after again all also any because been before being between both but could did does down "
          "each even every first from good great had has have her here him how into just last like little "
          "long many may more most much must never new now old only other our out over own same shall should "
          "since some still such than their them then there these this those through too under upon very "
          "well were what when where which while who will would year young").split()
PIECES = ("ing ed s er ly ness ful est tion ment able ous y e n t r d th ch sh ck ll ss nd ng st rt "
          "ght wn rd ld ct pt mb").split()
PUNCT = list(".,;:!?'\"()-[]") + ["\u65e5", "\u672c"]


def bert_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary: BERT's specials first, as in bert-base-uncased's order."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(3)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += PUNCT + letters + [f"##{c}" for c in letters] + WORDS + [f"##{p}" for p in PIECES]
    return list(dict.fromkeys(vocab))


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert(vocab_file):
    return build_tokenizer(f"bert:{vocab_file}")


def _pieces(tok, text):
    vocab = bert_vocab()
    return [vocab[i] for i in tok.encode(text)]


def test_bert_normalises_and_splits_like_bert(bert):
    assert len(bert_vocab()) > 200 and bert.vocab_size == len(bert_vocab())
    assert (bert.pad_id, bert.bos_id, bert.eos_id, bert.mask_id) == (0, 5, 6, 7)
    assert _pieces(bert, "HELLO World") == ["hello", "world"]  # lowercased
    assert _pieces(bert, "Café naïve résumé") == ["cafe", "naive", "resume"]  # accents stripped
    assert _pieces(bert, "hello,world!(darcy)") == ["hello", ",", "world", "!", "(", "darcy", ")"]
    assert _pieces(bert, "playing walked sisters") == ["play", "##ing", "walk", "##ed", "sister", "##s"]
    assert _pieces(bert, "\u65e5\u672chello") == ["\u65e5", "\u672c", "hello"]  # CJK characters split
    assert _pieces(bert, "[MASK] [CLS]") == ["[", "m", "##a", "##s", "##k", "]", "[", "c", "##l", "##s", "]"]
    assert "[UNK]" in _pieces(bert, "\u00fe\u00fe\u00fe")
    ids = bert.encode("Mr Darcy was walking, reading letters.")
    assert bert.decode(ids) == "mr darcy was walking, reading letters."
    assert bert.decode([bert.bos_id, *ids[:2], bert.mask_id, bert.eos_id, bert.pad_id]) == "mr darcy <mask>"


def test_bert_matches_the_reference_basic_and_wordpiece_tokenizers(bert):
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy",
                                 reason="transformers' Python BERT tokenizer is the reference")
    vocab = {t: i for i, t in enumerate(bert_vocab())}
    basic = legacy.BasicTokenizer(do_lower_case=True)
    wordpiece = legacy.WordpieceTokenizer(vocab=vocab, unk_token="[UNK]")
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEÉéïñ0123456789 .,;!?'\"()-\t\n") + ["\u65e5", "\U0001f600"]
    texts = [" ".join(rng.choice(WORDS + PIECES, size=12)).title() + " Naïve, CAFÉ-walking!"]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(1, 80)))) for _ in range(300)]
    for text in texts:
        want = [vocab[p] for word in basic.tokenize(text) for p in wordpiece.tokenize(word)]
        assert bert.encode(text) == want, text


def test_bert_round_trip_without_the_file(bert, vocab_file, tmp_path, monkeypatch):
    d = json.loads(json.dumps(bert.to_dict()))
    assert d["name"] == "bert" and d["vocab"] == bert_vocab()
    vocab_file_copy = tmp_path / "vocab.txt"
    shutil.copy(vocab_file, vocab_file_copy)
    again = tokenizer_from_dict(d)
    vocab_file_copy.unlink()
    assert fingerprint(again) == fingerprint(bert) and again.encode("Playing, reading") == bert.encode(
        "Playing, reading")
    monkeypatch.setenv("DDLM_BERT_VOCAB", str(vocab_file))
    assert fingerprint(build_tokenizer("bert")) == fingerprint(bert)
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text(bert._hf.to_str())  # a `tokenizers` JSON with the same WordPiece vocabulary
    assert fingerprint(build_tokenizer(f"bert:{tokenizer_json}")) == fingerprint(bert)


def test_bert_without_a_vocabulary_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("DDLM_BERT_VOCAB", raising=False)
    with pytest.raises(ConfigError) as err:
        build_tokenizer("bert")
    assert "vocab.txt" in str(err.value) and "30,522" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        build_tokenizer(f"bert:{tmp_path / 'none.txt'}")
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"lacks the special tokens \[PAD\]"):
        build_tokenizer(f"bert:{bad}")
    with pytest.raises(DataError, match="vocab"):
        tokenizer_from_dict({"name": "bert", "vocab_size": 3})


def test_bert_prepared_lm1b_style_rows(bert, tmp_path):
    """Pad packing with BERT: rows [CLS] ids [SEP] [PAD]..., the same as the in-memory path."""
    lines = [" ".join(np.random.default_rng(i).choice(WORDS, size=3 + i % 9)).capitalize() + "." for i in range(200)]
    source = tmp_path / "lm1b.txt"
    source.write_text("\n".join(lines) + "\n")
    prepare_corpus(str(source), bert, tmp_path / "p", packing="pad", workers=2, progress=False)
    got = open_prepared(tmp_path / "p").datasets(12)
    want = build_datasets(load_corpus(str(source)), bert, seq_len=12, packing="pad")
    for split in ("train", "valid", "test"):
        assert np.array_equal(got[split].tokens[:], want[split].tokens)
        assert np.array_equal(got[split].valid[:], want[split].valid)
    row = got["train"].tokens[0]
    assert row[0] == bert.bos_id and bert.eos_id in row.tolist()
