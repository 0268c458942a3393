"""Loss and decoding together: a tiny model must learn 5 synthetic utterances exactly."""

from __future__ import annotations

import math

import torch

from gharial.asr.config import ModelConfig
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.loss import rnnt_loss
from gharial.asr.model import RNNT
from gharial.asr.streaming import Recognizer

TRANSCRIPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 1, 9], [2, 7, 5, 0], [6, 3]]
STEPS = 500  # enough for every seed tried (0-7) to reach zero errors


def tone_utterance(tokens: list[int], sample_rate: int = 16000) -> torch.Tensor:
    """Each token is a 240 ms tone at its own pitch, with 120 ms of silence around it."""
    pieces = []
    for token in tokens:
        t = torch.arange(int(0.24 * sample_rate)) / sample_rate
        pieces += [
            torch.zeros(int(0.12 * sample_rate)),
            0.3 * torch.sin(2 * math.pi * (300 + 170 * token) * t),
        ]
    return torch.cat([*pieces, torch.zeros(int(0.12 * sample_rate))])


def test_tiny_model_overfits_five_utterances(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    raw = FeatureExtractor(tiny_config.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(tone_utterance(t)) for t in TRANSCRIPTS]))
    extractor = FeatureExtractor(tiny_config.features, stats)
    features = [extractor(tone_utterance(t)) for t in TRANSCRIPTS]
    batch = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    feature_lengths = torch.tensor([f.shape[0] for f in features])
    targets = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in TRANSCRIPTS], batch_first=True)
    target_lengths = torch.tensor([len(t) for t in TRANSCRIPTS])

    model = RNNT(tiny_config)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(STEPS):
        logits = model(batch, targets)
        loss = rnnt_loss(logits, targets, feature_lengths // 2, target_lengths, blank_id=model.blank_id)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # without it some seeds stall
        optimiser.step()

    assert loss.item() < 0.05
    recognizer = Recognizer(model.eval(), GreedyDecoder(model))
    decoded = [[t.id for t in recognizer.transcribe(f)] for f in features]
    assert decoded == TRANSCRIPTS
