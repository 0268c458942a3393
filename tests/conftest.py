"""Shared fixtures: small random models and real speech from ../shared/data/speech-dev."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import soundfile
import torch
from hypothesis import settings
from torch import Tensor

from gharial.asr.config import ModelConfig, load_model_config
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.loss import rnnt_loss
from gharial.asr.model import RNNT
from gharial.asr.tokenizer import train_tokenizer
from gharial.data.readers import read_utterances

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev"
# the real recording shipped in tests/assets (its SOURCES.md says why this take); its manifest names it
(SHIPPED_TAKE,) = read_utterances(Path(__file__).resolve().parent / "assets" / "manifest.json")
# Test models are tiny: one thread each avoids OpenMP spin-waiting against other processes on
# this 2-core machine, which otherwise slows the suite many times over.
torch.set_num_threads(1)

# CI must not fail on an example no earlier run tried: the default profile draws the same examples
# every run. `pytest --hypothesis-profile=explore` draws new ones (and saves any failure it finds).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")

VOCAB = 31  # the tiny config's vocabulary; blank is 31
PHRASES = ("the quick brown fox", "jumps over", "a lazy dog", "seven wizards", "can't vex", "the big sphinx")


def shipped_take_quieter(directory: Path, db: float) -> Path:
    """The shipped take `db` quieter, written as 16-bit PCM WAV (a microphone turned down)."""
    path = directory / f"quiet{db:.0f}.wav"
    quieter = SHIPPED_TAKE.load_audio(16000) * 10 ** (-db / 20)
    soundfile.write(path, quieter.numpy(), 16000, subtype="PCM_16")
    return path


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 5))) for _ in range(n)]


def emitting_model(seed: int = 0, acoustic_gain: float = 1.0) -> RNNT:
    """A random tiny model with a hand-set backbone so that it behaves like a trained one: joint unit
    k < VOCAB carries "the encoder proposes token k" into token k's logit, the prediction network
    remembers recently emitted tokens (one-hot embedding, half-open forget gate) and suppresses
    them, and blank wins otherwise. A purely random model emits `max_symbols` tokens every frame.
    `acoustic_gain` scales the encoder's say: 400 makes real speech propose a token every few frames."""
    torch.manual_seed(seed)
    model = RNNT(load_model_config("tiny")).eval()
    hidden = model.cfg.predictor.hidden
    eye = torch.eye(VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # what is left of the random weights is noise that breaks ties
        model.predictor.embed.weight.zero_()
        model.predictor.embed.weight[:, :VOCAB] += 3 * eye
        rnn = model.predictor.rnn  # gates i, f, g, o
        bias, weight = rnn.bias_ih_l0, rnn.weight_ih_l0
        assert isinstance(bias, Tensor) and isinstance(weight, Tensor)
        bias[:hidden] += 6  # input and output gates open, forget gate half open
        bias[hidden : 2 * hidden] *= 0
        bias[3 * hidden :] += 6
        weight[2 * hidden : 3 * hidden] += torch.eye(hidden)  # cell input: the token's one-hot
        model.joint.pred_proj.weight[:VOCAB, :VOCAB] -= 10 * eye
        model.joint.out.weight[:VOCAB, :VOCAB] += 4 * eye
        model.joint.out.bias[VOCAB] += 2
        if acoustic_gain != 1.0:
            model.joint.enc_proj.weight.mul_(acoustic_gain)
            model.joint.enc_proj.bias.fill_(-2)
    return model


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


def train_on_tones(
    cfg: ModelConfig, transcripts: list[list[int]], steps: int, seed: int = 0
) -> tuple[RNNT, FeatureExtractor, torch.Tensor]:
    """Train a fresh model on tone utterances; returns (model, its feature extractor, last loss)."""
    torch.manual_seed(seed)
    raw = FeatureExtractor(cfg.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(tone_utterance(t)) for t in transcripts]))
    extractor = FeatureExtractor(cfg.features, stats)
    features = [extractor(tone_utterance(t)) for t in transcripts]
    batch = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    frames = torch.tensor([f.shape[0] // cfg.encoder.stack_time for f in features])
    targets = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in transcripts], batch_first=True)
    target_lengths = torch.tensor([len(t) for t in transcripts])
    model = RNNT(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = rnnt_loss(model(batch, targets), targets, frames, target_lengths, blank_id=model.blank_id)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # without it some seeds stall
        optimiser.step()
    return model.eval(), extractor, loss.detach()


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return load_model_config("tiny")


@pytest.fixture(scope="session")
def speech_dev_manifest() -> list[dict[str, object]]:
    manifest = SPEECH_DEV / "manifest.json"
    if not manifest.exists():
        pytest.skip(f"speech-dev data not found at {SPEECH_DEV}")
    return json.loads(manifest.read_text())


@pytest.fixture(scope="session")
def tiny_tokenizer_bytes(tiny_config: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A sentencepiece model with exactly the tiny config's vocabulary size."""
    path = train_tokenizer(sentences(400), tiny_config.vocab_size, tmp_path_factory.mktemp("spm") / "spm")
    return path.read_bytes()
