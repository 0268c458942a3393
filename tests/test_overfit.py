"""Loss and decoding together: a tiny model must learn 5 synthetic utterances exactly."""

from __future__ import annotations

from gharial.asr.config import ModelConfig
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.streaming import Recognizer

from .conftest import tone_utterance, train_on_tones

TRANSCRIPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 1, 9], [2, 7, 5, 0], [6, 3]]
STEPS = 500  # enough for every seed tried (0-7) to reach zero errors


def test_tiny_model_overfits_five_utterances(tiny_config: ModelConfig) -> None:
    model, extractor, loss = train_on_tones(tiny_config, TRANSCRIPTS, STEPS)
    assert loss.item() < 0.05
    recognizer = Recognizer(model, GreedyDecoder(model))
    decoded = [[t.id for t in recognizer.transcribe(extractor(tone_utterance(t)))] for t in TRANSCRIPTS]
    assert decoded == TRANSCRIPTS
