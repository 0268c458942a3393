"""The CPU backend: a hardware checkpoint run by `Recognizer`, many streams' frames in one step.

Each step takes every frame waiting at that moment (one per stream) and advances all those streams
with one `Recognizer.step` call. A step starts once every open stream has its frame waiting, or
once the oldest waiting frame has waited the batch window, whichever comes first: like the card's
60 ms batches, but a frame waits at most the window. One step runs at a time, on a thread of its
own: torch lets go of the GIL in the model's matrix work, so the event loop goes on reading and
answering the streams' gRPC messages meanwhile, on the other core, instead of holding every
message that arrives during a step until it ends. Frames that arrive during a step wait for the
next one. The step also computes the frames' features, all streams' in one batch
(`FeatureExtractor.of_buffered_many`), which costs a fraction of doing them one by one.

Why wait at all: a step at a small batch is bound by reading the weights (the whole model streams
through the cache every step: en-small costs ~4 ms a step at batch 1 and ~24 ms at batch 100,
0.24 ms a frame), so steps run as soon as any frame arrives spend the core on weight traffic.
`bench/serving.py` measures it. Greedy or beam decoding, n-gram LM fusion, keyword boosting, state
resets and endpoints are the recognizer's (`gharial.asr`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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

DEFAULT_BATCH_WINDOW_S = 0.03


@dataclass
class _Frame:
    """One stream's frame waiting for a step; its result arrives on `decoded`."""

    stream: Stream[Any]
    buffered: Tensor  # the samples its features are computed from, in the step
    decoded: asyncio.Future[Decoded]


class CpuBackend:
    kind = "cpu"

    def __init__(
        self, stt: SpeechToText, max_streams: int, batch_window_s: float = DEFAULT_BATCH_WINDOW_S
    ) -> None:
        self.model = ModelAssets(stt.checkpoint.config.name, stt.features, stt.tokenizer)
        self.max_streams = max_streams
        self.batch_window_s = batch_window_s
        self.recognizer = stt.recognizer
        decoder = stt.recognizer.decoder
        self.beam_width = decoder.config.width if isinstance(decoder, BeamDecoder) else 0
        self._waiting: list[_Frame] = []
        self._open_streams = 0
        self._timer: asyncio.TimerHandle | None = None  # the window of the oldest waiting frame
        self._stepping = False  # a step is running on the model thread
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-step")
        self._closed = False

    async def open_stream(self, keywords: list[list[int]]) -> CpuStream:
        options = {"keywords": keywords} if self.beam_width and keywords else {}
        self._open_streams += 1
        return CpuStream(self, self.recognizer.new_stream(**options))

    def release_stream(self) -> None:
        self._open_streams -= 1
        self._step_if_complete()  # the frames waiting may now be every open stream's

    async def run(self, stream: Stream[Any], buffered: Tensor) -> Decoded:
        """Queue one frame for a step and wait for its result."""
        if self._closed:
            raise BackendError("the CPU backend has stopped")
        loop = asyncio.get_running_loop()
        frame = _Frame(stream, buffered, loop.create_future())
        self._waiting.append(frame)
        if len(self._waiting) == 1:
            self._timer = loop.call_at(loop.time() + self.batch_window_s, self._window_ended)
        self._step_if_complete()
        return await frame.decoded

    def close(self) -> None:
        """Stop: frames still waiting fail (their streams have had the drain to finish)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for frame in self._waiting:
            if not frame.decoded.done():
                frame.decoded.set_exception(BackendError("the CPU backend has stopped"))
        self._waiting = []
        self._model_thread.shutdown(wait=False)

    def _window_ended(self) -> None:
        self._timer = None
        self._step()

    def _step_if_complete(self) -> None:
        """Step now if every open stream has its frame waiting (each has at most one in flight)."""
        if self._waiting and len(self._waiting) >= self._open_streams:
            self._step()

    def _step(self) -> None:
        """Start a step over the frames waiting, unless one is running: its end starts the next."""
        if self._stepping or self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [frame for frame in self._waiting if not frame.decoded.done()]  # not cancelled
        self._waiting = []
        if not batch:
            return
        BATCH_SIZE.observe(len(batch))
        self._stepping = True
        running = asyncio.get_running_loop().run_in_executor(self._model_thread, self._decode, batch)
        running.add_done_callback(functools.partial(self._step_done, batch))

    def _step_done(self, batch: list[_Frame], running: asyncio.Future[list[Decoded]]) -> None:
        self._stepping = False
        error = running.exception()
        if error is not None:  # fail this batch's streams, keep serving the others
            log_event(log, "model_step_failed", logging.ERROR, streams=len(batch), error=repr(error))
        decoded = [] if error is not None else running.result()
        for i, frame in enumerate(batch):
            if frame.decoded.done():  # the stream went away during the step
                continue
            if error is not None:
                frame.decoded.set_exception(BackendError(f"model step failed: {error!r}"))
            else:
                frame.decoded.set_result(decoded[i])
        # Frames that came during the step: go on at once if they are all the streams' or if the
        # oldest one's window ended meanwhile (its timer found the step running and left them).
        if self._waiting and (self._timer is None or len(self._waiting) >= self._open_streams):
            self._step()

    def _decode(self, batch: list[_Frame]) -> list[Decoded]:
        features = torch.stack(self.model.features.of_buffered_many([frame.buffered for frame in batch]))
        results = self.recognizer.step(features, [frame.stream for frame in batch])
        decoder, eos = self.recognizer.decoder, self.recognizer.eos_token_id
        decoded = []
        for frame, result in zip(batch, results, strict=True):
            nbest = decoder.nbest(frame.stream.main.decoder, max(1, self.beam_width))
            shown = [([t for t in tokens if t.id != eos], score) for tokens, score in nbest]
            decoded.append(Decoded(result.final or [], result.provisional, shown))
        return decoded


@dataclass
class CpuStream:
    backend: CpuBackend
    stream: Stream[Any]
    closed: bool = False

    async def step(self, buffered: Tensor) -> Decoded:
        return await self.backend.run(self.stream, buffered)

    def finish(self) -> list[Token]:
        return self.backend.recognizer.finish(self.stream)

    async def close(self) -> None:
        """The stream's state is ordinary Python objects; closing only stops steps waiting for it."""
        if not self.closed:
            self.closed = True
            self.backend.release_stream()
