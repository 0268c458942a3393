"""SentencePiece tokenizer: exact vocab size, lossless roundtrip of normalised text, clear errors."""

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gharial.asr.text import normalize_transcript
from gharial.asr.tokenizer import VOCAB_SIZES, Tokenizer, train_tokenizer

VOCAB = 60
SUBJECTS = ["the cat", "a dog", "my sister", "our teacher", "the old man", "two birds", "Their neighbour"]
VERBS = ["quickly ate", "didn't see", "carefully painted", "jumped over", "found", "sold", "is watching"]
OBJECTS = ["the red apple", "a wooden fence", "those green houses", "her brother's bicycle", "the river"]
ENDINGS = ["yesterday.", "on 3 June!", "at 10:30?", "for $5, honestly", "near the station", "again"]
WORDS = sorted(
    {w for part in SUBJECTS + VERBS + OBJECTS + ENDINGS for w in normalize_transcript(part).split()}
)


def _sentences() -> list[str]:
    """~300 varied English sentences, deterministic, with raw punctuation/case/digits to be normalised."""
    combos = itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)
    return [" ".join(c) for c in itertools.islice(combos, 0, None, 4)][:300]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(_sentences(), VOCAB, tmp_path_factory.mktemp("spm") / "tok")


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.load(model_path)


def test_vocab_sizes() -> None:
    assert VOCAB_SIZES == {"testing": 1023, "base": 8703, "large": 17407}


def test_exact_vocab_size(tok: Tokenizer, model_path: Path) -> None:
    assert len(_sentences()) == 300
    assert model_path.name == "tok.model" and model_path.exists()
    assert tok.vocab_size == VOCAB == len(tok.id_to_piece)
    assert tok.piece(0) == "<unk>"


def test_encode_normalises_and_roundtrips(tok: Tokenizer) -> None:
    raw = "Their NEIGHBOUR didn’t see the river on 3 June!"
    ids = tok.encode(raw)
    assert ids == tok.encode(normalize_transcript(raw))
    assert all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "their neighbour didn't see the river on three june"


def test_unseen_characters_still_encode(tok: Tokenizer) -> None:
    """Every CHARSET character is in the vocabulary, so even words never seen in training avoid <unk>."""
    text = "zebra quiz jukebox x"
    ids = tok.encode(text)
    assert 0 not in ids
    assert tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12))
def test_roundtrip_property(tok: Tokenizer, words: list[str]) -> None:
    text = " ".join(words)
    assert tok.decode(tok.encode(text)) == normalize_transcript(text)


def test_starts_word(tok: Tokenizer) -> None:
    ids = tok.encode("the old man found the river")
    starts = [tok.starts_word(i) for i in ids]
    assert starts[0]
    assert sum(starts) == 6
    for i in range(tok.vocab_size):
        assert tok.starts_word(i) == tok.piece(i).startswith("▁")


def test_from_bytes_is_identical(tok: Tokenizer, model_path: Path) -> None:
    assert tok.model_bytes == model_path.read_bytes()
    clone = Tokenizer.from_bytes(tok.model_bytes)
    assert clone.vocab_size == tok.vocab_size
    assert clone.id_to_piece == tok.id_to_piece
    for sentence in _sentences()[:50]:
        assert clone.encode(sentence) == tok.encode(sentence)


def test_training_is_deterministic(tok: Tokenizer, tmp_path: Path) -> None:
    again = Tokenizer.load(train_tokenizer(_sentences(), VOCAB, tmp_path / "again"))
    assert again.model_bytes == tok.model_bytes


def test_user_defined_symbols(tmp_path: Path) -> None:
    tok = Tokenizer.load(train_tokenizer(_sentences(), VOCAB, tmp_path / "u", user_defined_symbols=["river"]))
    assert tok.vocab_size == VOCAB
    assert "river" in tok.id_to_piece
    with pytest.raises(ValueError, match="single normalised word"):
        train_tokenizer(_sentences(), VOCAB, tmp_path / "v", user_defined_symbols=["River"])


def test_bpe(tmp_path: Path) -> None:
    tok = Tokenizer.load(train_tokenizer(_sentences(), VOCAB, tmp_path / "bpe", model_type="bpe"))
    assert tok.vocab_size == VOCAB
    text = "the old man found the river"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("corrupt", [b"", b"not a model", b"\x00\xff" * 40])
def test_corrupt_bytes(corrupt: bytes) -> None:
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_bytes(corrupt)


def test_truncated_model(tok: Tokenizer) -> None:
    """Every prefix must be rejected, including cuts at piece boundaries that protobuf parses happily."""
    for n in range(len(tok.model_bytes)):
        with pytest.raises(ValueError, match="not a sentencepiece model"):
            Tokenizer.from_bytes(tok.model_bytes[:n])


def test_out_of_range_ids(tok: Tokenizer) -> None:
    blank = tok.vocab_size
    for bad in (blank, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.piece(bad)


def test_corpus_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"too small for vocab_size=500 \(at most \d+"):
        train_tokenizer(["the cat sat on the mat"] * 10, 500, tmp_path / "small")


def test_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty transcripts"):
        train_tokenizer(["", "?!", "   "], VOCAB, tmp_path / "empty")


def test_bad_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(_sentences(), VOCAB, tmp_path / "char", model_type="char")
