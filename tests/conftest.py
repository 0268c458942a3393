"""Shared fixtures: small random models and real speech from ../shared/data/speech-dev."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gharial.asr.config import ModelConfig, load_model_config
from gharial.asr.model import RNNT
from gharial.asr.tokenizer import train_tokenizer

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev"
PHRASES = ("the quick brown fox", "jumps over", "a lazy dog", "seven wizards", "can't vex", "the big sphinx")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 5))) for _ in range(n)]


def emitting_model(cfg: ModelConfig, seed: int = 0, blank_bias: float = 2.0) -> RNNT:
    """A random model whose blank logit is raised so it emits a few tokens per second,
    like a trained model, instead of blank everywhere or the maximum every frame."""
    torch.manual_seed(seed)
    model = RNNT(cfg).eval()
    with torch.no_grad():
        model.joint.out.bias[cfg.blank_id] += blank_bias
    return model


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
