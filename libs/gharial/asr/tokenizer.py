"""SentencePiece tokenizer over normalised transcripts.

The vocabulary holds only real tokens (id 0 is ``<unk>``, no BOS/EOS/PAD); the RNN-T blank is not
part of it and takes id ``vocab_size`` in the model. A trained tokenizer is fully described by its
serialized model proto (`Tokenizer.model_bytes`), which checkpoints embed so they are self-contained.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece.sentencepiece_model_pb2 import ModelProto  # type: ignore[attr-defined]

from gharial.asr.text import CHARSET, normalize_transcript

VOCAB_SIZES = {"testing": 1023, "base": 8703, "large": 17407}  # the CAIMAN-ASR model sizes
MODEL_TYPES = ("unigram", "bpe")
WORD_START = "▁"
_SEED = 0


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_prefix: Path,
    model_type: str = "unigram",
    user_defined_symbols: Iterable[str] = (),
) -> Path:
    """Train a sentencepiece model of exactly `vocab_size` pieces; returns ``{output_prefix}.model``.

    Transcripts are normalised first, so the tokenizer sees exactly what training targets look like.
    Every character of `CHARSET` is forced into the vocabulary so any normalised text encodes without
    ``<unk>``. Training is single-threaded with a fixed seed, and the temporary corpus path is cleared
    from the stored trainer spec, so the same texts give byte-identical model files.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {model_type!r}")
    user_defined_symbols = list(user_defined_symbols)
    for symbol in user_defined_symbols:  # anything else could never occur in normalised text
        if not symbol or " " in symbol or normalize_transcript(symbol) != symbol:
            raise ValueError(f"user-defined symbol {symbol!r} must be a single normalised word")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n_lines = 0
        with corpus.open("w", encoding="utf-8") as f:
            for text in texts:
                if line := normalize_transcript(text):
                    f.write(line + "\n")
                    n_lines += 1
        if n_lines == 0:
            raise ValueError("cannot train a tokenizer: no non-empty transcripts after normalisation")
        spm.set_random_generator_seed(_SEED)
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                required_chars=CHARSET.replace(" ", ""),
                user_defined_symbols=user_defined_symbols,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                unk_surface="",  # decoding never invents characters outside CHARSET
                hard_vocab_limit=True,
                normalization_rule_name="identity",  # normalize_transcript is the only normaliser
                input_sentence_size=100_000_000,
                shuffle_input_sentence=True,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "Vocabulary size too high" in str(e):
                limit = re.search(r"<= (\d+)", str(e))
                hint = f" (at most {limit.group(1)} for this text)" if limit else ""
                raise ValueError(
                    f"training text too small for vocab_size={vocab_size}{hint}: "
                    "use more transcripts or a smaller vocabulary"
                ) from e
            raise
    proto = ModelProto()
    proto.ParseFromString(writer.getvalue())
    proto.trainer_spec.ClearField("input")
    model_bytes = proto.SerializeToString(deterministic=True)
    if (got := Tokenizer.from_bytes(model_bytes).vocab_size) != vocab_size:  # guard against silent shrinking
        raise ValueError(f"sentencepiece produced {got} pieces, expected vocab_size={vocab_size}")
    model_path = Path(f"{output_prefix}.model")
    model_path.write_bytes(model_bytes)
    return model_path


class Tokenizer:
    """Text ↔ token ids. Ids are in ``[0, vocab_size)``; the blank (``vocab_size``) is not a token."""

    def __init__(self, model_bytes: bytes) -> None:
        _check_complete(model_bytes)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a sentencepiece model: {e}") from e
        self.model_bytes: bytes = bytes(model_bytes)
        self.vocab_size: int = self._sp.vocab_size()
        if self.vocab_size == 0:
            raise ValueError("not a sentencepiece model: it has no pieces")
        self.id_to_piece: list[str] = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._starts_word = [p.startswith(WORD_START) for p in self.id_to_piece]

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        return cls(model_bytes)

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[bytes]]:
        """Pickle as the model bytes (the sentencepiece processor itself does not pickle)."""
        return (Tokenizer, (self.model_bytes,))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def encode(self, text: str) -> list[int]:
        """Normalise then tokenize, so raw transcripts and normalised ones give the same ids."""
        return list(self._sp.encode(normalize_transcript(text), out_type=int))

    def nbest_segmentations(self, word: str, n: int) -> list[tuple[tuple[int, ...], float]]:
        """The `n` most probable segmentations of one normalised word, as (ids, log-probability),
        sorted by ids so the list does not depend on sentencepiece's internal ordering."""
        nbest = self._sp.nbest_encode_as_proto(word, nbest_size=n).nbests
        return sorted((tuple(p.id for p in seg.pieces), float(seg.score)) for seg in nbest)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return str(self._sp.decode(ids))

    def piece(self, id: int) -> str:
        self._check_id(id)
        return self.id_to_piece[id]

    def starts_word(self, id: int) -> bool:
        """True if the piece begins a new word ("▁..."): where word-level LM fusion scores a finished word."""
        self._check_id(id)
        return self._starts_word[id]

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size:
            raise ValueError(
                f"token id {id} outside the vocabulary [0, {self.vocab_size}) (the blank, {self.vocab_size}, "
                "is not a token)"
            )


def _check_complete(model_bytes: bytes) -> None:
    """Catch truncation that still parses: protobuf accepts a prefix cut at a piece boundary."""
    proto = ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf's DecodeError, whose import path varies between runtimes
        raise ValueError(f"not a sentencepiece model: {e}") from e
    if not proto.HasField("trainer_spec") or not proto.HasField("normalizer_spec"):
        raise ValueError("not a sentencepiece model: trainer/normalizer spec missing (truncated?)")
    spec = proto.trainer_spec
    if spec.hard_vocab_limit and len(proto.pieces) != spec.vocab_size:
        raise ValueError(
            f"not a sentencepiece model: {len(proto.pieces)} pieces but trained for {spec.vocab_size} "
            "(truncated?)"
        )
