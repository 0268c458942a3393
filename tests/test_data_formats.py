"""Every data format reads into the same utterances and batches; malformed input names its file."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gharial.asr.config import ModelConfig
from gharial.asr.features import FeatureExtractor
from gharial.asr.text import normalize_transcript
from gharial.asr.tokenizer import Tokenizer
from gharial.data.manifest import ManifestError, Utterance, write_json_manifest
from gharial.data.readers import read_audio_dir, read_utterances
from gharial.training.batch import BatchMaker
from gharial.training.config import AugmentConfig, ConfigError, TrainConfig, load_train_config
from gharial.training.trainer import load_training_data
from tests.conftest import sentences

GHARIAL = Path(sys.executable).parent / "gharial"

RATE = 16000
DURATIONS = (0.5, 0.8, 1.1, 1.4)
FORMATS = ("json", "tar_file", "tar_dir", "tar_glob", "audio_dir", "hf_disk", "parquet_file", "parquet_dir")


@dataclass(frozen=True)
class Source:
    id: str
    file: Path
    transcript: str
    samples: np.ndarray  # as decoded from the file


def write_audio(path: Path, seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """A tone plus noise as 16-bit PCM; returns the samples as they decode."""
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(len(t))
    audio = 0.3 * np.sin(2 * np.pi * (200 + 150 * seed) * t) + 0.05 * noise
    soundfile.write(str(path), audio.astype(np.float32), rate, subtype="PCM_16")
    return soundfile.read(str(path), dtype="float32")[0]


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_manifest(path: Path, entries: list[tuple[str, Path, str]]) -> None:
    """A JSON manifest of (id, audio file, transcript); the rate declared is RATE."""
    utterances = [
        Utterance(
            id=i, audio=f, transcript=t, duration=soundfile.info(str(f)).duration if f.is_file() else 1.0
        )
        for i, f, t in entries
    ]
    write_json_manifest(path, utterances, sample_rate=RATE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """Four utterances, FLAC and WAV, each with its transcript beside it (the audio-dir format)."""
    audio_dir = tmp_path_factory.mktemp("corpus") / "audio"
    audio_dir.mkdir()
    sources = []
    for i, (seconds, transcript) in enumerate(zip(DURATIONS, sentences(4), strict=True)):
        file = audio_dir / f"utt{i}.{'flac' if i % 2 == 0 else 'wav'}"
        sources.append(Source(f"utt{i}", file, transcript, write_audio(file, seconds, seed=i)))
        file.with_suffix(".txt").write_text(transcript + "\n")
    return sources


@pytest.fixture(scope="module")
def formats(corpus: list[Source]) -> dict[str, str | Path]:
    """The corpus written in every format, each a path `read_utterances` accepts."""
    root = corpus[0].file.parent.parent
    write_manifest(root / "manifest.json", [(s.id, s.file, s.transcript) for s in corpus])
    members = [
        m
        for s in corpus
        for m in ((s.file.name, s.file.read_bytes()), (f"{s.id}.txt", s.transcript.encode()))
    ]
    write_shard(root / "all.tar", members)
    (root / "shards").mkdir()
    write_shard(root / "shards" / "train_0.tar", members[:4])
    write_shard(root / "shards" / "train_1.tar", members[4:])
    dataset = datasets.Dataset.from_dict(
        {
            "id": [s.id for s in corpus],
            "audio": [{"bytes": s.file.read_bytes(), "path": s.file.name} for s in corpus],
            "text": [s.transcript for s in corpus],
        }
    )
    dataset.save_to_disk(str(root / "hf_disk"))
    (root / "parquet").mkdir()
    dataset.to_parquet(str(root / "parquet" / "train.parquet"))
    return {
        "json": root / "manifest.json",
        "tar_file": root / "all.tar",
        "tar_dir": root / "shards",
        "tar_glob": str(root / "shards" / "train_*.tar"),
        "audio_dir": root / "audio",
        "hf_disk": root / "hf_disk",
        "parquet_file": root / "parquet" / "train.parquet",
        "parquet_dir": root / "parquet",
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_ids_transcripts_durations_and_samples(
    fmt: str, corpus: list[Source], formats: dict[str, str | Path]
) -> None:
    utterances = read_utterances(formats[fmt])
    assert [u.id for u in utterances] == [s.id for s in corpus]
    assert [u.transcript for u in utterances] == [s.transcript for s in corpus]
    assert [u.duration for u in utterances] == pytest.approx(DURATIONS, abs=1e-4)
    assert all(u.sample_rate == RATE for u in utterances)
    for utt, source in zip(utterances, corpus, strict=True):
        assert np.array_equal(utt.load_audio(RATE).numpy(), source.samples)


def test_tar_and_dataset_audio_stays_in_memory_and_names_its_container(
    corpus: list[Source], formats: dict[str, str | Path]
) -> None:
    shard = Path(formats["tar_dir"]) / "train_1.tar"
    assert [(u.id, u.audio, u.audio_bytes) for u in read_utterances(shard)] == [
        (s.id, shard / s.file.name, s.file.read_bytes()) for s in corpus[2:]
    ]
    parquet = Path(formats["parquet_file"])
    assert [u.audio for u in read_utterances(parquet)] == [parquet / s.file.name for s in corpus]


def test_all_formats_give_identical_batches(
    corpus: list[Source],
    formats: dict[str, str | Path],
    tiny_config: ModelConfig,
    tiny_tokenizer_bytes: bytes,
) -> None:
    make = BatchMaker(
        FeatureExtractor(tiny_config.features), Tokenizer.from_bytes(tiny_tokenizer_bytes), AugmentConfig()
    )
    reference = read_utterances(formats["json"])
    for train in (False, True):
        expected = make(reference, step=7, seed=3, train=train)
        for fmt in FORMATS[1:]:
            batch = make(read_utterances(formats[fmt]), step=7, seed=3, train=train)
            for field in ("features", "feature_lengths", "targets", "target_lengths"):
                assert torch.equal(getattr(batch, field), getattr(expected, field)), (fmt, train, field)
            assert batch.audio_seconds == expected.audio_seconds


def test_audio_dir_nested_with_separate_transcript_dir(tmp_path: Path) -> None:
    (tmp_path / "audio" / "a").mkdir(parents=True)
    (tmp_path / "txt" / "a").mkdir(parents=True)
    write_audio(tmp_path / "audio" / "a" / "x.wav", 0.5, seed=0)
    write_audio(tmp_path / "audio" / "y.flac", 0.5, seed=1)
    (tmp_path / "txt" / "a" / "x.txt").write_text("the quick brown fox\n")
    (tmp_path / "txt" / "y.txt").write_text("a lazy dog")
    utterances = read_audio_dir(tmp_path / "audio", tmp_path / "txt")
    assert [(u.id, u.transcript) for u in utterances] == [("a/x", "the quick brown fox"), ("y", "a lazy dog")]
    with pytest.raises(ManifestError, match=r"audio/a/x\.txt not found"):
        read_utterances(tmp_path / "audio")  # transcripts are not beside the audio


def test_hf_dataset_with_audio_paths_only(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    samples = write_audio(tmp_path / "clips" / "x.wav", 0.6, seed=2)
    datasets.Dataset.from_dict(
        {"audio": [{"bytes": None, "path": "clips/x.wav"}], "sentence": ["seven wizards"]}
    ).to_parquet(str(tmp_path / "data.parquet"))
    [utt] = read_utterances(tmp_path / "data.parquet")
    assert (utt.id, utt.audio, utt.audio_bytes, utt.transcript) == (
        "data.parquet:0",
        tmp_path / "clips" / "x.wav",
        None,
        "seven wizards",
    )
    assert np.array_equal(utt.load_audio(RATE).numpy(), samples)


def test_hf_dataset_without_needed_columns_is_refused(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"audio": [{"bytes": b"", "path": "x.wav"}], "label": [3]}).to_parquet(
        str(tmp_path / "data.parquet")
    )
    with pytest.raises(
        ManifestError, match=r"data\.parquet: needs .* transcript column .* it has audio, label"
    ):
        read_utterances(tmp_path / "data.parquet")


# -- bad input -------------------------------------------------------------------------------------


def train_config(manifest: Path, model: ModelConfig) -> TrainConfig:
    data = {"train_manifests": [manifest], "tokenizer": "unused.model", "mel_stats": "unused.json"}
    return TrainConfig.model_validate({"name": "formats", "model": model, "data": data})


def test_missing_audio_file_is_named(tmp_path: Path, tiny_config: ModelConfig) -> None:
    write_manifest(tmp_path / "m.json", [("gone", tmp_path / "audio" / "gone.flac", "a lazy dog")])
    [utt] = read_utterances(tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"utterance gone: audio file .*audio/gone\.flac not found"):
        utt.load_audio(RATE)
    cfg = train_config(tmp_path / "m.json", tiny_config)
    with pytest.raises(ManifestError, match=r"audio files are missing.*audio/gone\.flac"):
        load_training_data(cfg)


def test_wrong_sample_rate_is_named(tmp_path: Path) -> None:
    write_audio(tmp_path / "slow.wav", 0.5, seed=0, rate=8000)
    write_manifest(tmp_path / "m.json", [("slow", tmp_path / "slow.wav", "seven wizards")])
    [utt] = read_utterances(tmp_path / "m.json")
    with pytest.raises(
        ValueError, match=r"slow\.wav is sampled at 8000 Hz, but its manifest declares 16000 Hz"
    ):
        utt.load_audio(RATE)
    assert len(utt.model_copy(update={"sample_rate": 8000}).load_audio(RATE)) == RATE // 2  # resampled


def test_empty_transcript_names_manifest_and_utterance(tmp_path: Path, tiny_config: ModelConfig) -> None:
    write_audio(tmp_path / "a.flac", 0.5, seed=0)
    write_manifest(
        tmp_path / "m.json",
        [("fine", tmp_path / "a.flac", "a lazy dog"), ("blank", tmp_path / "a.flac", " ?! ")],
    )
    cfg = train_config(tmp_path / "m.json", tiny_config)
    with pytest.raises(ManifestError, match=r"m\.json: utterance blank has an empty transcript"):
        load_training_data(cfg)


def shard_cuts(shard: Path) -> dict[str, int]:
    """Byte counts to keep when truncating `shard`: cuts inside and between its members."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        end = tar.offset
    return {
        "empty": 0,
        "mid_header": 100,
        "mid_data": members[1].offset_data + 10,
        "between_members": members[2].offset,
        "no_end_marker": end,
    }


@pytest.mark.parametrize("cut", ["empty", "mid_header", "mid_data", "between_members", "no_end_marker"])
def test_corrupt_tar_shard_is_named(cut: str, tmp_path: Path, formats: dict[str, str | Path]) -> None:
    data = (Path(formats["tar_dir"]) / "train_0.tar").read_bytes()
    shard = tmp_path / "broken_7.tar"
    shard.write_bytes(data[: shard_cuts(Path(formats["tar_dir"]) / "train_0.tar")[cut]])
    with pytest.raises(ManifestError, match=r"broken_7\.tar: (unreadable|truncated)"):
        read_utterances(shard)


def test_not_a_tar_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "noise.tar").write_bytes(b"not a tar archive " * 100)
    with pytest.raises(ManifestError, match=r"noise\.tar: unreadable tar shard"):
        read_utterances(tmp_path / "noise.tar")


@pytest.mark.parametrize(("lonely", "missing"), [(".flac", "transcript"), (".txt", "audio")])
def test_tar_key_without_its_pair_is_named(
    lonely: str, missing: str, corpus: list[Source], tmp_path: Path
) -> None:
    members = [("a.flac", corpus[0].file.read_bytes()), ("a.txt", b"the big sphinx")]
    members += [(f"lonely{lonely}", corpus[0].file.read_bytes() if lonely == ".flac" else b"jumps over")]
    write_shard(tmp_path / "shard.tar", members)
    with pytest.raises(ManifestError, match=rf"shard\.tar: key 'lonely' has no {missing}"):
        read_utterances(tmp_path / "shard.tar")


CONFIG = """\
name: formats
model: tiny
data:
  train_manifests: [m.json]
  tokenizer: spm.model
  mel_stats: mel.json
"""


@pytest.mark.parametrize(
    ("extra", "key", "line"),
    [("  max_duraton_s: 10\n", "data.max_duraton_s", 7), ("global_batchsize: 8\n", "global_batchsize", 7)],
)
def test_unknown_config_key_names_file_key_and_line(extra: str, key: str, line: int, tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(CONFIG + extra + "seed: 2\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(tmp_path / "recipe.yaml")
    assert f"recipe.yaml:{line}: {key}: Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[{"transcript": "a",\n  "files": [}]', r"m\.json: not valid JSON \(line 2"),
        ('{"transcript": "a"}', r"m\.json: a manifest must be a JSON list"),
        ('[{"transcript": "a", "files": []}]', r"m\.json: entry 0: files: List should have at least 1 item"),
    ],
)
def test_invalid_manifest_is_named(text: str, error: str, tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(ManifestError, match=error):
        read_utterances(tmp_path / "m.json")


# -- parsing property ------------------------------------------------------------------------------

TINY_FLAC = io.BytesIO()
soundfile.write(TINY_FLAC, np.zeros(160, dtype=np.float32), RATE, format="FLAC")
SEGMENT = st.text(
    st.characters(codec="utf-8", exclude_characters="./\\", exclude_categories=("Cc", "Cs")),
    min_size=1,
    max_size=10,
)
KEY = st.lists(SEGMENT, min_size=1, max_size=2).map("/".join)  # WebDataset keys may hold folders


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(KEY, st.text(st.characters(codec="utf-8"), max_size=40), min_size=1, max_size=4))
def test_tar_shards_round_trip_any_keys_and_transcripts(items: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "any.tar"
        members = [
            m
            for k, t in items.items()
            for m in ((f"{k}.txt", t.encode()), (f"{k}.flac", TINY_FLAC.getvalue()))
        ]
        write_shard(shard, members)
        utterances = read_utterances(shard)
    assert [(u.id, u.transcript, u.duration) for u in utterances] == [
        (k, t.strip(), 0.01) for k, t in items.items()
    ]


@pytest.mark.parametrize("fmt", ["json", "tar_file", "hf_disk"])
def test_normalized_manifest_of_any_format_reads_back(
    fmt: str, corpus: list[Source], formats: dict[str, str | Path], tmp_path: Path
) -> None:
    """`gharial data normalize` writes a JSON manifest (audio from archives extracted beside it)."""
    out = tmp_path / "normalised" / "manifest.json"
    out.parent.mkdir()
    result = subprocess.run(
        [str(GHARIAL), "data", "normalize", str(formats[fmt]), "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    utterances = read_utterances(out)
    assert [u.transcript for u in utterances] == [normalize_transcript(s.transcript) for s in corpus]
    for utt, source in zip(utterances, corpus, strict=True):
        assert np.array_equal(utt.load_audio(RATE).numpy(), source.samples)
