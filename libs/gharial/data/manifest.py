"""JSON manifests (the CAIMAN-ASR schema) and the `Utterance` record every data reader yields.

A manifest is a JSON list of entries like::

    {"transcript": "...", "original_duration": 4.2,
     "files": [{"fname": "audio/x.flac", "channels": 1, "sample_rate": 16000,
                "duration": 4.2, "num_samples": 67281}],
     "id": "...", "speaker": "..."}      # id and speaker are optional extras

`fname` is relative to the manifest's folder. When `files` lists several versions of the same
audio, the first one is used.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

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

    def load_audio(self, sample_rate: int) -> Tensor:
        """Mono float32 samples at `sample_rate`; errors name the utterance's source."""
        source = io.BytesIO(self.audio_bytes) if self.audio_bytes is not None else self.audio
        try:
            return load_audio(source, sample_rate)
        except ValueError as err:
            raise ValueError(f"utterance {self.id}: {err}") from err


class ManifestFile(BaseModel):
    fname: str
    channels: int = 1
    sample_rate: int = 16000
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
            )
        )
    return utterances


def write_json_manifest(path: str | Path, utterances: list[Utterance], sample_rate: int = 16000) -> None:
    """Write `utterances` as a manifest at `path`; audio paths are stored relative to its folder."""
    path = Path(path)
    entries = []
    for utt in utterances:
        fname = Path(utt.audio).resolve().relative_to(path.parent.resolve())
        entries.append(
            {
                "transcript": utt.transcript,
                "files": [
                    {
                        "fname": fname.as_posix(),
                        "channels": 1,
                        "sample_rate": sample_rate,
                        "duration": round(utt.duration, 4),
                        "num_samples": round(utt.duration * sample_rate),
                    }
                ],
                "original_duration": round(utt.duration, 4),
                "id": utt.id,
                **({"speaker": utt.speaker} if utt.speaker else {}),
            }
        )
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
