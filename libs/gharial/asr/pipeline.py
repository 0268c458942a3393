"""Audio in, text out: a hardware checkpoint's model, features, tokenizer and decoder together."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import Tensor

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.base import Decoder, Token
from gharial.asr.decoding.beam import BeamConfig, BeamDecoder
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.decoding.lm import NgramLM
from gharial.asr.features import FeatureExtractor
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.prepacked import prepack_for_cpu
from gharial.asr.streaming import Recognizer, StreamingConfig
from gharial.asr.tokenizer import WORD_START, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLED_CHECKPOINT = REPO_ROOT / "models" / "en-small" / "en-small.hwckpt"
EOS_PIECE = "<EOS>"


class Transcript(BaseModel):
    transcript: str
    tokens: list[int]
    seconds: float  # wall-clock time spent recognising


def bundled_checkpoint() -> Path:
    """The default model shipped in models/; a clear error until one is bundled."""
    if not BUNDLED_CHECKPOINT.exists():
        raise FileNotFoundError(f"no bundled model at {BUNDLED_CHECKPOINT}; pass --checkpoint")
    return BUNDLED_CHECKPOINT


def tokens_to_text(tokenizer: Tokenizer, tokens: list[Token]) -> str:
    """Pieces joined with '▁' as the word separator; a leading space is kept, so the texts of
    consecutive token runs concatenate into the text of the whole run."""
    return "".join(tokenizer.piece(t.id) for t in tokens).replace(WORD_START, " ")


class SpeechToText:
    def __init__(
        self,
        checkpoint: HardwareCheckpoint,
        beam_width: int = 1,
        streaming: StreamingConfig | None = None,
        beam: BeamConfig | None = None,
        auto_gain: AutoGainConfig | None = DEFAULT_AUTO_GAIN,
    ) -> None:
        self.checkpoint = checkpoint
        self.model = prepack_for_cpu(checkpoint.build_model())  # inference only: faster batched steps
        features = checkpoint.meta.config.features
        self.features = FeatureExtractor(features, checkpoint.meta.mel_stats, auto_gain)
        self.tokenizer = Tokenizer.from_bytes(checkpoint.tokenizer_model)
        pieces = self.tokenizer.id_to_piece
        decoder: Decoder[Any]
        if beam_width > 1 or beam is not None:
            lm = NgramLM.from_bytes(checkpoint.ngram_lm) if checkpoint.ngram_lm else None
            config = (beam or BeamConfig()).model_copy(update={"width": beam_width})
            decoder = BeamDecoder(self.model, config, pieces=pieces, lm=lm)
        else:
            decoder = GreedyDecoder(self.model)
        eos = pieces.index(EOS_PIECE) if EOS_PIECE in pieces else None
        self.recognizer: Recognizer[Any] = Recognizer(self.model, decoder, streaming, eos_token_id=eos)

    @classmethod
    def load(cls, path: str | Path | None = None, **options: Any) -> SpeechToText:
        return cls(HardwareCheckpoint.load(path or bundled_checkpoint()), **options)

    def text(self, tokens: list[Token]) -> str:
        return tokens_to_text(self.tokenizer, tokens).strip()

    def transcribe(self, audio: Tensor) -> Transcript:
        """Offline recognition of one utterance: float audio at the model's sample rate."""
        started = time.perf_counter()
        tokens = self.recognizer.transcribe(self.features(audio))
        return Transcript(
            transcript=self.text(tokens),
            tokens=[t.id for t in tokens],
            seconds=time.perf_counter() - started,
        )
