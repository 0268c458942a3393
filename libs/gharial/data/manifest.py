"""JSON manifests (the CAIMAN-ASR schema) and the `Utterance` record every data reader yields.

A manifest is a JSON list of entries like::

    {"transcript": "...", "original_duration": 4.2,
     "files": [{"fname": "audio/x.flac", "channels": 1, "sample_rate": 16000,
                "duration": 4.2, "num_samples": 67281}],
     "id": "...", "speaker": "..."}      # id and speaker are optional extras

`fname` is relative to the manifest's folder. When `files` lists several versions of the same
audio, the first one is used. Loading an utterance checks its file really has the declared
`sample_rate`: a mislabelled corpus would otherwise train at the wrong speed without any error.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import soundfile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from gharial.audio import load_audio


class Utterance(BaseModel):
    """One training/validation example: its audio (a file, or the encoded file's bytes when it
    came out of an archive or a dataset) and what was said."""

    model_config = ConfigDict(frozen=True)

    id: str
    audio: Path
    transcript: str
    duration: float = Field(ge=0)
    speaker: str | None = None
    audio_bytes: bytes | None = Field(None, repr=False, description="encoded audio (WAV/FLAC) held in memory")
    sample_rate: int | None = Field(None, gt=0, description="the audio's rate as its source states it")

    def load_audio(self, sample_rate: int) -> Tensor:
        """Mono float32 samples at `sample_rate`. Errors name the utterance and its file, so that one
        bad file in a large corpus can be found and fixed."""
        if self.audio_bytes is None and not self.audio.is_file():
            raise ValueError(f"utterance {self.id}: audio file {self.audio} not found")
        try:
            samples = load_audio(self._source(), sample_rate)
        except ValueError as err:
            raise ValueError(f"utterance {self.id}: {err}") from err
        if self.sample_rate is not None:
            actual = soundfile.info(self._source()).samplerate
            if actual != self.sample_rate:
                raise ValueError(
                    f"utterance {self.id}: {self.audio} is sampled at {actual} Hz, "
                    f"but its manifest declares {self.sample_rate} Hz"
                )
        return samples

    def _source(self) -> str | io.BytesIO:
        return io.BytesIO(self.audio_bytes) if self.audio_bytes is not None else str(self.audio)


class ManifestFile(BaseModel):
    fname: str
    channels: int = 1
    sample_rate: int | None = Field(None, gt=0)
    duration: float = Field(ge=0)
    num_samples: int | None = None


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    transcript: str
    files: list[ManifestFile] = Field(min_length=1)
    original_duration: float | None = None
    id: str | None = None
    speaker: str | None = None


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the entry."""


def read_json_manifest(path: str | Path) -> list[Utterance]:
    """Utterances of a JSON manifest, audio paths resolved against the manifest's folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ManifestError(f"{path}: manifest not found") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(raw, list):
        raise ManifestError(f"{path}: a manifest must be a JSON list of entries")
    utterances = []
    for index, item in enumerate(raw):
        try:
            entry = ManifestEntry.model_validate(item)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"{path}: entry {index}: {where}: {first['msg']}") from err
        audio = entry.files[0]
        utterances.append(
            Utterance(
                id=entry.id or Path(audio.fname).stem,
                audio=path.parent / audio.fname,
                transcript=entry.transcript,
                duration=audio.duration,
                speaker=entry.speaker,
                sample_rate=audio.sample_rate,
            )
        )
    return utterances


def require_audio_files(utterances: list[Utterance]) -> None:
    """Refuse a data set whose audio files are not all there, before any work starts on it."""
    missing = [str(u.audio) for u in utterances if u.audio_bytes is None and not u.audio.is_file()]
    if missing:
        raise ManifestError(f"{len(missing)} audio files are missing, e.g. {', '.join(missing[:3])}")


def write_json_manifest(path: str | Path, utterances: list[Utterance], sample_rate: int = 16000) -> None:
    """Write `utterances` as a manifest at `path`; audio paths are stored relative to its folder.
    Audio held in memory (from tar shards or datasets) is written out to `audio/` beside it first.
    `sample_rate` is declared for utterances whose own rate is unknown."""
    path = Path(path)
    entries = []
    for utt in utterances:
        audio = Path(utt.audio)
        if utt.audio_bytes is not None:
            audio = path.parent / "audio" / audio.name
            audio.parent.mkdir(parents=True, exist_ok=True)
            audio.write_bytes(utt.audio_bytes)
        fname = Path(os.path.relpath(audio.resolve(), path.parent.resolve()))
        rate = utt.sample_rate or sample_rate
        entries.append(
            {
                "transcript": utt.transcript,
                "files": [
                    {
                        "fname": fname.as_posix(),
                        "channels": 1,
                        "sample_rate": rate,
                        "duration": round(utt.duration, 4),
                        "num_samples": round(utt.duration * rate),
                    }
                ],
                "original_duration": round(utt.duration, 4),
                "id": utt.id,
                **({"speaker": utt.speaker} if utt.speaker else {}),
            }
        )
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
