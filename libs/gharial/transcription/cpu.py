"""The CPU backend: a hardware checkpoint run by `Recognizer`, every waiting stream in one step.

One thread runs the steps. Each step takes every frame waiting at that moment (one per stream) and
advances all those streams with one `Recognizer.step` call, and the next step starts as soon as it
returns, so a frame waits at most one step before its own. Greedy or beam decoding, n-gram LM
fusion, keyword boosting, state resets and endpoints are the recognizer's (`gharial.asr`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gharial.asr.decoding.base import Token
from gharial.asr.decoding.beam import BeamDecoder
from gharial.asr.pipeline import SpeechToText
from gharial.asr.streaming import Stream
from gharial.plumbing.logs import log_event
from gharial.transcription.backend import BackendError, Decoded, ModelAssets
from gharial.transcription.metrics import BATCH_SIZE

log = logging.getLogger(__name__)


@dataclass
class _Frame:
    """One stream's frame waiting for a step, and then its result."""

    stream: Stream[Any]
    features: Tensor
    done: threading.Event = field(default_factory=threading.Event)
    decoded: Decoded | None = None
    error: Exception | None = None


class CpuBackend:
    kind = "cpu"

    def __init__(self, stt: SpeechToText, max_streams: int) -> None:
        self.model = ModelAssets(stt.checkpoint.config.name, stt.features, stt.tokenizer)
        self.max_streams = max_streams
        self.recognizer = stt.recognizer
        decoder = stt.recognizer.decoder
        self.beam_width = decoder.config.width if isinstance(decoder, BeamDecoder) else 0
        self._waiting: list[_Frame] = []
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run_steps, name="cpu-steps", daemon=True)
        self._thread.start()

    def open_stream(self, keywords: list[list[int]]) -> CpuStream:
        options = {"keywords": keywords} if self.beam_width and keywords else {}
        return CpuStream(self, self.recognizer.new_stream(**options))

    def run(self, stream: Stream[Any], features: Tensor) -> Decoded:
        """Queue one frame for the next step and wait for its result."""
        frame = _Frame(stream, features)
        with self._condition:
            if self._closed:
                raise BackendError("the CPU backend has stopped")
            self._waiting.append(frame)
            self._condition.notify()
        frame.done.wait()
        if frame.decoded is None:
            raise BackendError(f"model step failed: {frame.error}") from frame.error
        return frame.decoded

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _run_steps(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            BATCH_SIZE.observe(len(batch))
            try:
                self._step(batch)
            except Exception as error:  # fail this batch's streams, keep serving the others
                log_event(log, "model_step_failed", logging.ERROR, streams=len(batch), error=repr(error))
                for frame in batch:
                    frame.error = error
            for frame in batch:
                frame.done.set()

    def _step(self, batch: list[_Frame]) -> None:
        features = torch.stack([frame.features for frame in batch])
        results = self.recognizer.step(features, [frame.stream for frame in batch])
        decoder, eos = self.recognizer.decoder, self.recognizer.eos_token_id
        for frame, result in zip(batch, results, strict=True):
            nbest = decoder.nbest(frame.stream.main.decoder, max(1, self.beam_width))
            shown = [([t for t in tokens if t.id != eos], score) for tokens, score in nbest]
            frame.decoded = Decoded(result.final or [], result.provisional, shown)


@dataclass
class CpuStream:
    backend: CpuBackend
    stream: Stream[Any]

    def step(self, features: Tensor) -> Decoded:
        return self.backend.run(self.stream, features)

    def finish(self) -> list[Token]:
        return self.backend.recognizer.finish(self.stream)

    def close(self) -> None:
        """Nothing to free: the stream's state is ordinary Python objects."""
