"""Automatic gain (gharial.asr.level): what it lifts, what it leaves alone, and that streaming and
offline apply the same gains, on a real recording of the seen speaker turned up and down."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gharial.asr.config import load_model_config
from gharial.asr.features import FeatureExtractor
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig, LevelTracker, block_energies_dbfs
from gharial.audio import load_audio

from .conftest import SHIPPED_TAKE

FEATURES = load_model_config("base").features
FRAME = 960  # samples per 60 ms frame
BLOCK = 160  # samples per 10 ms block
SPEECH = load_audio(SHIPPED_TAKE.audio, 16000)


def speech(offset_db: float, seconds: float | None = None) -> torch.Tensor:
    """The recording turned by `offset_db`, cut to whole frames (and to `seconds` if given)."""
    n = len(SPEECH) if seconds is None else int(seconds * 16000)
    return SPEECH[: n // FRAME * FRAME] * 10 ** (offset_db / 20)


def frames(audio: torch.Tensor) -> torch.Tensor:
    return audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)


def gains_frame_by_frame(audio: torch.Tensor, cfg: AutoGainConfig = DEFAULT_AUTO_GAIN) -> list[float]:
    tracker = LevelTracker(cfg)
    return [tracker.gains_db(frame[None], BLOCK)[0] for frame in frames(audio)]


def white_noise(seconds: float, dbfs: float, seed: int = 0) -> torch.Tensor:
    n = int(seconds * 16000) // FRAME * FRAME
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10 ** (dbfs / 20)


def test_speech_at_training_level_is_untouched_bit_for_bit() -> None:
    audio = speech(0.0)
    tracker = LevelTracker(DEFAULT_AUTO_GAIN)
    assert not any(tracker.gains_db(frames(audio), BLOCK))
    assert tracker.level_dbfs is not None and tracker.level_dbfs > DEFAULT_AUTO_GAIN.boost_below_dbfs
    plain, lifted = FeatureExtractor(FEATURES), FeatureExtractor(FEATURES, auto_gain=DEFAULT_AUTO_GAIN)
    assert torch.equal(plain(audio), lifted(audio))


@pytest.mark.parametrize("offset_db", [-20.0, -30.0])
def test_quiet_speech_is_measured_and_lifted_to_the_target(offset_db: float) -> None:
    normal, quiet = LevelTracker(DEFAULT_AUTO_GAIN), LevelTracker(DEFAULT_AUTO_GAIN)
    normal.gains_db(frames(speech(0.0)), BLOCK)
    gains = quiet.gains_db(frames(speech(offset_db)), BLOCK)
    assert normal.level_dbfs is not None and quiet.level_dbfs is not None
    assert quiet.level_dbfs == pytest.approx(normal.level_dbfs + offset_db, abs=0.5)
    assert gains[-1] == pytest.approx(DEFAULT_AUTO_GAIN.target_dbfs - quiet.level_dbfs, abs=1e-9)
    assert gains[0] == 0.0  # the recording starts with silence: nothing to go on yet


def test_silence_and_steady_noise_are_never_lifted() -> None:
    for audio in (torch.zeros(3 * 16000 // FRAME * FRAME), white_noise(3.0, -50.0), white_noise(3.0, -85.0)):
        tracker = LevelTracker(DEFAULT_AUTO_GAIN)
        assert not any(tracker.gains_db(frames(audio), BLOCK))
        assert tracker.level_dbfs is None


def test_the_level_and_gain_hold_through_a_pause_with_background_noise() -> None:
    quiet = speech(-30.0)
    pause = white_noise(3.0, -80.0)  # hiss 17 dB under the speech, above the quietest speech blocks
    gains = gains_frame_by_frame(torch.cat([quiet, pause, quiet]))
    before, during = len(quiet) // FRAME, len(pause) // FRAME
    paused = gains[before : before + during]
    assert gains[before - 1] > 20.0
    assert all(g == pytest.approx(gains[before - 1], abs=1.0) for g in paused)


def test_a_quiet_stream_whose_talker_comes_close_is_not_blown_up() -> None:
    audio = torch.cat([speech(-35.0), speech(0.0)])
    tracker = LevelTracker(DEFAULT_AUTO_GAIN)
    lifted = tracker.apply(frames(audio), BLOCK).reshape(-1)
    assert max(block_energies_dbfs(lifted.reshape(-1, FRAME), BLOCK)) <= DEFAULT_AUTO_GAIN.ceiling_dbfs + 1e-6
    gains = gains_frame_by_frame(audio)
    assert max(gains[: len(speech(-35.0)) // FRAME]) > 25.0  # the quiet part was lifted


def test_the_gain_rises_no_faster_than_the_attack_and_waits_for_settle() -> None:
    cfg = DEFAULT_AUTO_GAIN.model_copy(update={"attack_db_per_s": 100.0, "settle_s": 0.5})
    tracker = LevelTracker(cfg)
    previous = 0.0
    for frame in frames(speech(-40.0)):
        gain = tracker.gains_db(frame[None], BLOCK)[0]
        assert gain - previous <= 100.0 * 0.06 + 1e-9
        if tracker.speech_blocks * 0.01 < 0.5:
            assert gain == 0.0
        previous = gain
    assert previous > 30.0  # but it gets there


def test_a_level_that_may_be_an_onset_waits_longer_than_a_clearly_quiet_one() -> None:
    """Every talker's first syllable is quieter than their speech: a level just under the training
    range is only trusted after unsure_settle_s of speech, a far lower one at once."""
    cfg = DEFAULT_AUTO_GAIN.model_copy(update={"unsure_settle_s": 0.4})
    for offset_db, wait_s in ((-14.0, 0.4), (-40.0, cfg.settle_s)):
        tracker = LevelTracker(cfg)
        lifted_after = None
        for frame in frames(speech(offset_db)):
            if tracker.gains_db(frame[None], BLOCK)[0] > 0 and lifted_after is None:
                lifted_after = tracker.speech_blocks * 0.01
        assert tracker.level_dbfs is not None
        assert (tracker.level_dbfs > cfg.unsure_below_dbfs) == (offset_db == -14.0)
        assert lifted_after is not None and wait_s <= lifted_after < wait_s + 0.07


@settings(max_examples=25, deadline=None)
@given(
    seconds=st.floats(0.1, 2.5),
    offset_db=st.floats(-45.0, 0.0),
    cuts=st.lists(st.integers(0, 40000), max_size=10),
)
def test_any_cutting_of_a_stream_gives_the_offline_features(
    seconds: float, offset_db: float, cuts: list[int]
) -> None:
    """The gains are decided per whole 60 ms frame, so chunk boundaries cannot move them."""
    audio = SPEECH[: int(seconds * 16000)] * 10 ** (offset_db / 20)
    extractor = FeatureExtractor(FEATURES, auto_gain=DEFAULT_AUTO_GAIN)
    stream = extractor.stream()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(audio)), len(audio)]
    parts = [stream.accept(audio[a:b]) for a, b in itertools.pairwise(bounds)]
    assert torch.equal(torch.cat([*parts, stream.flush()]), extractor(audio))


def test_the_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="target_dbfs must not be below boost_below_dbfs"):
        AutoGainConfig(target_dbfs=-50.0)
    with pytest.raises(ValidationError, match="extra"):
        AutoGainConfig.model_validate({"gain": 3})
    with pytest.raises(ValidationError):
        AutoGainConfig(max_gain_db=-1.0)


def test_digital_silence_before_the_speech_does_not_make_the_room_hiss_speech() -> None:
    """A padded file, or a browser microphone that starts with zeros and fades in (a block of
    rounding noise at -105 dBFS, as the demo page's resampler sends): the recording's own room sound
    after it is not speech, so speech at training level stays untouched."""
    fade_in = torch.cat([torch.zeros(FRAME - BLOCK), SPEECH[:BLOCK] * 10 ** (-45 / 20)])
    assert -110 < block_energies_dbfs(fade_in[None, -BLOCK:], BLOCK)[0] < -100
    padded = torch.cat([torch.zeros(30 * FRAME), fade_in, speech(0.0), torch.zeros(30 * FRAME)])
    assert not any(gains_frame_by_frame(padded))
    plain, lifted = FeatureExtractor(FEATURES), FeatureExtractor(FEATURES, auto_gain=DEFAULT_AUTO_GAIN)
    assert torch.equal(plain(padded), lifted(padded))
