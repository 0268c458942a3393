"""Validation: WER scoring with Whisper's normaliser, lock-step streaming decoding, the out-of-memory
split, and `gharial validate` end to end on a tiny checkpoint and manifests in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile
import torch
from torch import Tensor

import gharial.validation as validation
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import ModelConfig
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.model import RNNT
from gharial.asr.pipeline import SpeechToText
from gharial.asr.streaming import StreamingConfig
from gharial.data.manifest import Utterance, write_json_manifest
from gharial.data.readers import read_utterances
from gharial.validation import (
    UtteranceResult,
    decode_in_lockstep,
    edit_distance,
    normalize_for_wer,
    report,
    score,
    validate,
)

from .conftest import SHIPPED_TAKE, emitting_model, shipped_take_quieter, tone_utterance

GHARIAL = Path(sys.executable).parent / "gharial"
RATE = 16000
# Out of manifest order by duration, so that results must be put back in order.
TRANSCRIPTS = ["The colour of Mr. Smith's car.", "Twenty-five wizards", "Hello, world!"]
TONES = [[1, 5, 9, 3], [2, 7], [4, 8, 6]]
REFERENCE_WORDS = 7 + 2 + 2  # "the color of mister smith is car", "25 wizards", "hello world"


# -- scoring ----------------------------------------------------------------------------------------
def test_edit_distance() -> None:
    assert edit_distance([], []) == 0
    assert edit_distance(["a"], []) == 1
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2  # one substitution, one insertion
    assert edit_distance(["a", "b", "c", "d"], ["b", "c", "d"]) == 1  # one deletion
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance(list("sitting"), list("kitten")) == 3


def test_normaliser_forgives_spelling_and_abbreviations() -> None:
    assert normalize_for_wer("The colour of Mr. Smith's car.") == [
        "the",
        "color",
        "of",
        "mister",
        "smith",
        "is",
        "car",
    ]
    assert normalize_for_wer("Dr. Who said twenty-five") == ["doctor", "who", "said", "25"]
    assert normalize_for_wer("  ") == []


def test_score_and_report_exact_numbers() -> None:
    results = score(
        ["u1", "u2", "u3", "u4"],
        ["The colour of Mr. Smith's car.", "Dr. Who said twenty-five", "Hello, WORLD!", "mister smith's car"],
        ["the color of mister smith is car", "doctor who said 25 things", "world", "Mr. smiths car"],
    )
    assert [(r.errors, r.words) for r in results] == [(0, 7), (1, 4), (1, 2), (2, 4)]
    assert results[3] == UtteranceResult(
        id="u4", reference="mister smith's car", hypothesis="Mr. smiths car", errors=2, words=4
    )
    summary = report(results, audio_seconds=10.0, decode_seconds=2.5)
    assert (summary.errors, summary.words, summary.utterances) == (4, 17, 4)
    assert summary.wer == 4 / 17
    assert summary.rtf == 0.25
    assert summary.results == results
    empty = report([], audio_seconds=0.0, decode_seconds=0.0)
    assert (empty.wer, empty.rtf, empty.words) == (0.0, 0.0, 0)


# -- decoding ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tone utterances (FLAC) and a manifest in a folder of their own."""
    root = tmp_path_factory.mktemp("val")
    (root / "audio").mkdir()
    utterances = []
    for i, (text, tones) in enumerate(zip(TRANSCRIPTS, TONES, strict=True)):
        path = root / "audio" / f"utt{i}.flac"
        audio = tone_utterance(tones)
        soundfile.write(path, audio.numpy(), RATE)
        utterances.append(Utterance(id=f"utt{i}", audio=path, transcript=text, duration=len(audio) / RATE))
    write_json_manifest(root / "manifest.json", utterances)
    return root


def save_checkpoint(model: RNNT, tokenizer_bytes: bytes, path: Path) -> Path:
    raw = FeatureExtractor(model.cfg.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(tone_utterance(t)) for t in TONES]))
    HardwareCheckpoint.from_model(model, stats, tokenizer_bytes).save(path)
    return path


@pytest.fixture(scope="module")
def emitting_checkpoint(tiny_tokenizer_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that emits a few tokens on each tone utterance."""
    path = tmp_path_factory.mktemp("ckpt") / "emitting.hwckpt"
    return save_checkpoint(emitting_model(acoustic_gain=600), tiny_tokenizer_bytes, path)


def silent_model(cfg: ModelConfig) -> RNNT:
    """Blank wins every frame by a mile: the hypothesis is always empty."""
    model = RNNT(cfg)
    with torch.no_grad():
        model.joint.out.weight.zero_()
        model.joint.out.bias.zero_()
        model.joint.out.bias[model.blank_id] = 50.0
    return model


def test_wer_of_a_model_that_emits_nothing(
    data: Path, tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, tmp_path: Path
) -> None:
    hw = HardwareCheckpoint.load(
        save_checkpoint(silent_model(tiny_config), tiny_tokenizer_bytes, tmp_path / "s.hwckpt")
    )
    utterances = read_utterances(data / "manifest.json")
    result = validate(hw, utterances)
    assert result.wer == 1.0
    assert result.words == result.errors == REFERENCE_WORDS
    assert result.utterances == 3
    assert [r.hypothesis for r in result.results] == ["", "", ""]
    assert [r.id for r in result.results] == ["utt0", "utt1", "utt2"]
    assert [r.words for r in result.results] == [7, 2, 2]
    assert result.audio_seconds == pytest.approx(sum(u.duration for u in utterances), abs=1e-3)
    assert result.rtf == pytest.approx(result.decode_seconds / result.audio_seconds)


@pytest.mark.parametrize(
    "streaming",
    [None, StreamingConfig(sr_segment_s=0.6, sr_overlap_s=0.24, endpoint_silence_ms=180)],
    ids=["plain", "state-resets"],
)
def test_lockstep_decoding_matches_offline_transcription(
    data: Path, emitting_checkpoint: Path, streaming: StreamingConfig | None
) -> None:
    hw = HardwareCheckpoint.load(emitting_checkpoint)
    stt = SpeechToText(hw, streaming=streaming)
    utterances = read_utterances(data / "manifest.json")
    features = [stt.features(u.load_audio(RATE)) for u in utterances]
    assert len({len(f) for f in features}) == 3, "different lengths: streams finish at different frames"
    lockstep = decode_in_lockstep(stt, features)
    offline = [stt.recognizer.transcribe(f) for f in features]
    assert [[(t.id, t.frame) for t in tokens] for tokens in lockstep] == [
        [(t.id, t.frame) for t in tokens] for tokens in offline
    ]
    assert all(offline), "the test model emits tokens on every utterance"

    result = validate(hw, utterances, streaming=streaming)
    expected = score(
        [u.id for u in utterances], [u.transcript for u in utterances], [stt.text(t) for t in offline]
    )
    assert result.results == expected
    assert result.errors == sum(r.errors for r in expected) and result.words == REFERENCE_WORDS


def test_out_of_memory_batches_are_split_and_retried(
    data: Path, emitting_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hw = HardwareCheckpoint.load(emitting_checkpoint)
    utterances = read_utterances(data / "manifest.json")
    expected = validate(hw, utterances)
    calls: list[int] = []

    def fails_once_when_batched(stt: SpeechToText, features: list[Tensor]) -> Any:
        calls.append(len(features))
        if len(features) > 1 and calls.count(len(features)) == 1 and len(calls) == 1:
            raise RuntimeError("CPU out of memory (tried to allocate 12 GiB)")
        return decode_in_lockstep(stt, features)

    monkeypatch.setattr(validation, "decode_in_lockstep", fails_once_when_batched)
    result = validate(hw, utterances)
    assert calls == [3, 1, 2], "the batch of 3 fails once and is retried as 1 + 2"
    assert result.results == expected.results
    assert result.utterances == 3

    def always_fails(stt: SpeechToText, features: list[Tensor]) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(validation, "decode_in_lockstep", always_fails)
    with pytest.raises(RuntimeError, match="out of memory"):  # a single utterance that does not fit
        validate(hw, utterances[:1])

    def other_error(stt: SpeechToText, features: list[Tensor]) -> Any:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(validation, "decode_in_lockstep", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        validate(hw, utterances)


def test_batches_respect_max_inputs(
    data: Path, emitting_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hw = HardwareCheckpoint.load(emitting_checkpoint)
    utterances = read_utterances(data / "manifest.json")
    sizes: list[int] = []

    def counting(stt: SpeechToText, features: list[Tensor]) -> Any:
        sizes.append(len(features))
        return decode_in_lockstep(stt, features)

    monkeypatch.setattr(validation, "decode_in_lockstep", counting)
    f = hw.meta.config.features
    per_second = f.feature_dim * 1000 / (f.hop_ms * f.stack)  # encoder inputs per second of audio
    longest = max(u.duration for u in utterances)
    validate(hw, utterances, max_inputs_per_batch=int(longest * per_second) + 1)
    assert sizes == [1, 1, 1]
    sizes.clear()
    validate(hw, utterances)
    assert sizes == [3]


# -- the CLI --------------------------------------------------------------------------------------------
def gharial(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GHARIAL, *map(str, args)], capture_output=True, text=True)


def test_validate_cli_json_and_dumped_predictions(
    data: Path, emitting_checkpoint: Path, tmp_path: Path
) -> None:
    # two manifests (--manifest repeated); fname is relative to each manifest's folder
    utterances = read_utterances(data / "manifest.json")
    (tmp_path / "a").mkdir()
    write_json_manifest(data / "first.json", utterances[:2])
    write_json_manifest(data / "second.json", utterances[2:])
    preds = tmp_path / "a" / "preds.jsonl"
    out = gharial(
        "validate", "--checkpoint", emitting_checkpoint, "--manifest", data / "first.json",
        "--manifest", data / "second.json", "--json", "--dump-preds", preds,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert set(printed) == {"wer", "words", "errors", "utterances", "audio_seconds", "decode_seconds", "rtf"}
    expected = validate(HardwareCheckpoint.load(emitting_checkpoint), utterances)
    assert printed["wer"] == expected.wer and expected.wer > 0
    assert (printed["words"], printed["errors"], printed["utterances"]) == (
        REFERENCE_WORDS,
        expected.errors,
        3,
    )
    assert printed["audio_seconds"] == pytest.approx(expected.audio_seconds)
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert lines == [r.model_dump() for r in expected.results]
    assert set(lines[0]) == {"id", "reference", "hypothesis", "errors", "words"}


def test_validate_cli_measures_with_and_without_auto_gain(tmp_path: Path) -> None:
    """The bundled model on the shipped take 30 dB down: heard with automatic gain, lost without."""
    quiet = shipped_take_quieter(tmp_path, 30.0)
    write_json_manifest(tmp_path / "quiet.json", [SHIPPED_TAKE.model_copy(update={"audio": quiet})])
    wers = {}
    for flag in ("--auto-gain", "--no-auto-gain"):
        out = gharial("validate", "--manifest", tmp_path / "quiet.json", "--json", flag)
        assert out.returncode == 0, out.stderr
        wers[flag] = json.loads(out.stdout)["wer"]
    assert wers == {"--auto-gain": 0.0, "--no-auto-gain": 1.0}


def test_validate_cli_table_with_beam_and_state_resets(data: Path, emitting_checkpoint: Path) -> None:
    args = ["--checkpoint", emitting_checkpoint, "--manifest", data / "manifest.json", "--beam", 2]
    out = gharial(
        "validate", *args, "--sr-segment", 0.6, "--sr-overlap", 0.24, "--max-inputs-per-batch", 50_000
    )
    assert out.returncode == 0, out.stderr
    expected = validate(
        HardwareCheckpoint.load(emitting_checkpoint),
        read_utterances(data / "manifest.json"),
        beam_width=2,
        streaming=StreamingConfig(sr_segment_s=0.6, sr_overlap_s=0.24),
    )
    assert "{" not in out.stdout
    assert f"WER         {100 * expected.wer:.2f}%" in out.stdout
    assert f"words       {REFERENCE_WORDS}" in out.stdout


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda d, c: ["--checkpoint", c, "--manifest", d / "missing.json"],
            "missing.json: manifest not found",
        ),
        (lambda d, c: ["--checkpoint", d / "nope.hwckpt", "--manifest", d / "manifest.json"], "no such file"),
        (lambda d, c: ["--checkpoint", c, "--manifest", d / "no_audio.json"], "audio files are missing"),
        (
            lambda d, c: [
                "--checkpoint",
                c,
                "--manifest",
                d / "manifest.json",
                "--sr-segment",
                2,
                "--sr-overlap",
                3,
            ],
            "sr_overlap_s must be shorter",
        ),
    ],
    ids=["missing-manifest", "missing-checkpoint", "missing-audio", "bad-state-resets"],
)
def test_validate_cli_errors_exit_2(
    data: Path, emitting_checkpoint: Path, make_args: Any, message: str
) -> None:
    gone = Utterance(id="gone", audio=data / "audio" / "gone.flac", transcript="x", duration=1.0)
    (data / "audio" / "gone.flac").touch()
    write_json_manifest(data / "no_audio.json", [gone])
    (data / "audio" / "gone.flac").unlink()
    out = gharial("validate", *make_args(data, emitting_checkpoint))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
