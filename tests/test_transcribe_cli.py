"""`gharial transcribe` end to end: a real WAV file, a hardware checkpoint on disk, the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile
import torch

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import ModelConfig
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.pipeline import SpeechToText
from gharial.audio import load_audio, resample

from .conftest import SPEECH_DEV, emitting_model, shipped_take_quieter

GHARIAL = Path(sys.executable).parent / "gharial"


@pytest.fixture(scope="module")
def wav(speech_dev_manifest: list[dict[str, Any]]) -> Path:
    return SPEECH_DEV / speech_dev_manifest[2]["files"][0]["fname"]


@pytest.fixture(scope="module")
def checkpoint(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, wav: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    stats = MelStats.from_log_mels(FeatureExtractor(tiny_config.features).raw_log_mels(load_audio(wav)))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.hwckpt"
    HardwareCheckpoint.from_model(emitting_model(acoustic_gain=400), stats, tiny_tokenizer_bytes).save(path)
    return path


def gharial(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GHARIAL, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("beam", [1, 3])
def test_transcribe_json(wav: Path, checkpoint: Path, beam: int) -> None:
    out = gharial("transcribe", wav, "--checkpoint", checkpoint, "--beam", beam, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"transcript", "tokens", "seconds"}
    expected = SpeechToText.load(checkpoint, beam_width=beam).transcribe(load_audio(wav))
    assert result["tokens"] == expected.tokens
    assert result["transcript"] == expected.transcript
    if beam == 1:
        assert result["tokens"], "the test model emits tokens on this speech"


def test_transcribe_plain_text_and_resampled_input(wav: Path, checkpoint: Path, tmp_path: Path) -> None:
    audio = load_audio(wav)
    stereo_44k = tmp_path / "stereo44k.wav"
    upsampled = resample(audio, 16000, 44100)
    soundfile.write(stereo_44k, torch.stack([upsampled, upsampled], 1).numpy(), 44100)
    out = gharial("transcribe", stereo_44k, "--checkpoint", checkpoint)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and "{" not in out.stdout


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, wav, ckpt: [wav, "--checkpoint", tmp / "nope.hwckpt"], "no such file"),
        (lambda tmp, wav, ckpt: [tmp / "nope.wav", "--checkpoint", ckpt], "cannot read audio file"),
        (lambda tmp, wav, ckpt: [wav, "--checkpoint", wav], "not a torch file"),
    ],
)
def test_transcribe_errors_are_clear(
    tmp_path: Path, wav: Path, checkpoint: Path, make_args: Any, message: str
) -> None:
    out = gharial("transcribe", *make_args(tmp_path, wav, checkpoint))
    assert out.returncode == 2
    assert message in out.stderr.lower()


WORDS_ARPA = """\\data\\
ngram 1=7
ngram 2=2

\\1-grams:
-1.0\t</s>
-99\t<s>\t-0.3
-2.0\t<unk>
-0.8\tthe\t-0.3
-1.2\tquick\t-0.3
-1.2\tbrown
-1.0\tfox

\\2-grams:
-0.2\t<s> the
-0.3\tthe quick

\\end\\
"""


def test_transcribe_with_the_checkpoints_ngram_lm(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, wav: Path, tmp_path: Path
) -> None:
    """A checkpoint that carries an n-gram LM decodes with it under beam search."""
    path = tmp_path / "with_lm.hwckpt"
    model = emitting_model(acoustic_gain=400)
    stats = MelStats.identity(tiny_config.features.n_mels)
    HardwareCheckpoint.from_model(model, stats, tiny_tokenizer_bytes, ngram_lm=WORDS_ARPA.encode()).save(path)
    with_lm = SpeechToText.load(path, beam_width=3)
    assert with_lm.recognizer.decoder.lm is not None  # type: ignore[attr-defined]
    out = gharial("transcribe", wav, "--checkpoint", path, "--beam", 3, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == with_lm.transcribe(load_audio(wav)).tokens


def test_unreadable_embedded_lm_is_a_clear_error(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, wav: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bad_lm.hwckpt"
    stats = MelStats.identity(tiny_config.features.n_mels)
    HardwareCheckpoint.from_model(emitting_model(), stats, tiny_tokenizer_bytes, ngram_lm=b"not an lm").save(
        path
    )
    out = gharial("transcribe", wav, "--checkpoint", path, "--beam", 2)
    assert out.returncode == 2
    assert "embedded n-gram LM (9 bytes) cannot be read" in out.stderr


ASSET_TEXT = "i know that you are in charge there and jeanne knows"


def test_transcribe_lifts_a_quiet_recording_unless_told_not_to(tmp_path: Path) -> None:
    quiet = shipped_take_quieter(tmp_path, 30.0)
    lifted = gharial("transcribe", quiet)
    assert lifted.returncode == 0, lifted.stderr
    assert lifted.stdout.strip() == ASSET_TEXT  # the bundled model, as at the take's own level
    as_is = gharial("transcribe", quiet, "--no-auto-gain")
    assert as_is.returncode == 0, as_is.stderr
    assert as_is.stdout.strip() == ""
