"""What a transcriber backend does for a stream, whatever runs the model: the CPU (`cpu.py`) or an
accelerator card (`accelerator.py`).

A backend runs the model for many streams at once; each stream sends it one 60 ms frame of
features at a time and waits for that frame's decoding before sending the next, the pattern both
a batched CPU step and the card's one-frame-in-flight rule need. Backends are used from the
transcriber's event loop: what waits is a coroutine, never a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from gharial.asr.decoding.base import Token
from gharial.asr.features import FeatureExtractor
from gharial.asr.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelAssets:
    """What the host needs around the model: features in, text out."""

    name: str  # the architecture's name (e.g. en-small): the worker's default model id
    features: FeatureExtractor
    tokenizer: Tokenizer


@dataclass(frozen=True)
class Decoded:
    """One frame's decoding: what became final, what is still open, and the decoder's hypotheses."""

    final: list[Token]  # tokens finalised at this frame (often none)
    provisional: list[Token]  # the unfinalised tail after it
    nbest: list[tuple[list[Token], float]]  # unfinalised hypotheses with log-scores, best first


class BackendError(Exception):
    """The backend cannot go on with a stream (e.g. its card went away); the stream may be retried
    on another worker."""


class BackendFull(Exception):
    """No room for another stream (e.g. the card's state memory is full)."""


class BackendStream(Protocol):
    async def step(self, buffered: Tensor) -> Decoded:
        """Decode one 60 ms frame, given as its stream's buffered samples
        (`StreamingFeatures.take_frames`): the backend computes the features, so that it may
        compute many streams' at once."""
        ...

    def finish(self) -> list[Token]:
        """End of stream: the tokens still unfinalised, now final."""
        ...

    async def close(self) -> None:
        """Free the stream's resources; safe to call more than once."""
        ...


class Backend(Protocol):
    kind: str  # "cpu" or "accelerator" (WorkerInfo.backend)
    model: ModelAssets
    max_streams: int  # what the backend itself can hold

    async def open_stream(self, keywords: list[list[int]]) -> BackendStream:
        """A new stream; `keywords` (token-id sequences) are boosted where the decoder supports it.
        Raises BackendFull or BackendError."""
        ...

    def close(self) -> None:
        """Stop: called once every stream has ended."""
        ...
