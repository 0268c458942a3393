"""`gharial data synth`: which voices exist, how speakers vary, how a corpus is planned and rendered."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gharial.data.manifest import read_json_manifest
from gharial.data.synth import (
    ENGINES,
    NEURAL_VOICES,
    Voice,
    available_voices,
    build_corpus,
    make_speaker,
    plan_corpus,
    render,
    synthesize,
)

INSTALLED = {voice.engine: voice for voice in available_voices()}


def installed(engine: str) -> Voice:
    if engine not in INSTALLED:
        pytest.skip(f"TTS engine {engine} is not installed here")
    return INSTALLED[engine]


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="unknown TTS engines \\['festival'\\]"):
        available_voices(["espeak", "festival"])


def test_engine_choice_filters_voices() -> None:
    installed("espeak")
    assert {v.engine for v in available_voices(["espeak"])} == {"espeak"}
    assert available_voices([]) == []


def test_formant_voice_speakers_are_unchanged() -> None:
    """synth-v1 must stay reproducible: the settings drawn for its voices are pinned."""
    speaker = make_speaker(Voice("espeak", "en-us+m1"), random.Random("0/synth_000000"))
    assert speaker == pytest.approx(
        {"rate": 0.8503276754788514, "pitch": 0.9024221749357236, "warp": 0.98, "rt60": 0.0,
         "snr_db": 19.2659491885751, "narrowband": 0.0}
    )  # fmt: skip


@pytest.mark.parametrize("engine", list(NEURAL_VOICES))
def test_neural_speakers_vary_by_warp_not_pitch(engine: str) -> None:
    voice = Voice(engine, NEURAL_VOICES[engine][0])
    speakers = [make_speaker(voice, random.Random(i)) for i in range(300)]
    assert all(s["pitch"] == 1.0 for s in speakers)
    warps = [s["warp"] for s in speakers]
    assert 0.84 <= min(warps) < 0.88 and 1.12 < max(warps) <= 1.18  # wider than the formant voices'
    assert len({s["prosody_seed"] for s in speakers}) == 300


def test_neural_voice_refuses_pitch() -> None:
    with pytest.raises(ValueError, match="no pitch control"):
        render(Voice("hibari", "heart"), "hello there", rate=1.0, pitch=1.2)


def test_plan_keeps_held_out_voices_and_sentences_apart() -> None:
    voices = [Voice("espeak", f"en-us+m{i}") for i in range(1, 4)] + [Voice("flite", "rms")]
    sentences = [f"sentence number {i}" for i in range(40)]
    plan = list(plan_corpus(sentences, voices, 30, 6, ["flite:rms"], seed=5))
    train = [(v, s) for _, v, s, held in plan if not held]
    test = [(v, s) for _, v, s, held in plan if held]
    assert len(train) == 30 and len(test) == 6
    assert all(v.family != "flite:rms" for v, _ in train)
    assert all(v.family == "flite:rms" for v, _ in test)
    assert not {s for _, s in train} & {s for _, s in test}
    assert plan == list(plan_corpus(sentences, voices, 30, 6, ["flite:rms"], seed=5))


def test_plan_names_missing_held_out_voice() -> None:
    with pytest.raises(ValueError, match="held-out voices not installed: \\['piper:joe'\\]"):
        list(plan_corpus(["a b c d"] * 5, [Voice("hibari", "heart")], 1, 1, ["piper:joe"], seed=0))


@pytest.mark.parametrize("engine", ENGINES)
def test_rate_changes_duration(engine: str) -> None:
    """Every engine's rate control works: slow speech is longer than fast speech of the same text.
    Piper draws its phone durations at random inside its ONNX graph (one pair once came out at a
    ratio of 1.23 where the rates' is 1.56), so the lengths are summed over three renders."""
    voice = installed(engine)
    text = "The quick brown fox jumps over the lazy dog."
    slow, fast = ([render(voice, text, rate, 1.0, seed=3 + k) for k in range(3)] for rate in (0.8, 1.25))
    assert all(audio.dim() == 1 for audio in slow + fast)
    slow_s, fast_s = (sum(len(audio) for audio in renders) / len(renders) / 16000 for renders in (slow, fast))
    assert 1.0 < fast_s < slow_s < 8.0
    assert slow_s / fast_s > 1.25
    assert float(slow[0].abs().max()) > 0.05


@pytest.mark.parametrize("engine", ENGINES)
def test_synthesized_utterance_is_normalised_audio(engine: str) -> None:
    voice = installed(engine)
    rng = random.Random("test")
    audio = synthesize(voice, "Hello there, how are you today?", make_speaker(voice, rng), rng)
    peak = float(audio.abs().max())
    assert 0.19 < peak < 0.91 and audio.isfinite().all()


def test_corpus_of_one_engine(tmp_path: Path) -> None:
    voice = installed("hibari")
    train, heldout = build_corpus(tmp_path, 3, 0, seed=2, engines=[voice.engine], workers=1, progress=False)
    utterances = read_json_manifest(train)
    assert [u.speaker for u in utterances] == ["hibari:heart"] * 3
    assert all(u.audio.exists() and 0.5 < u.duration < 20 for u in utterances)
    assert read_json_manifest(heldout) == []
