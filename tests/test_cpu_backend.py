"""The CPU backend's batching, in-process with the bundled model: one step over every stream's
waiting frame, steps on the model thread one at a time, and streams that go away mid-step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.pipeline import SpeechToText, bundled_checkpoint
from gharial.audio import load_audio
from gharial.transcription.backend import BackendError
from gharial.transcription.cpu import CpuBackend

from .conftest import SPEECH_DEV

RECORDINGS = sorted((SPEECH_DEV / "audio").glob("*.wav"))[:3]
pytestmark = pytest.mark.skipif(len(RECORDINGS) < 3, reason="needs speech-dev")


@pytest.fixture(scope="module")
def stt() -> SpeechToText:
    return SpeechToText(HardwareCheckpoint.load(bundled_checkpoint()))


def frames_of(stt: SpeechToText, audio: Tensor) -> list[Tensor]:
    """The stream's frames as a session hands them to the backend: the samples each frame's
    features are computed from (`StreamingFeatures.take_frames`), the tail padded."""
    features = stt.features.stream()
    n = stt.features.samples_per_frame
    frames = [features.take_frames(audio[i : i + n]) for i in range(0, len(audio), n)]
    return [f for f in [*frames, features.flush_frames()] if f is not None]


def spy_on_steps(backend: CpuBackend, gate: threading.Event | None = None) -> list[int]:
    """Batch sizes of the backend's model steps, in order; each step first waits for `gate`."""
    sizes: list[int] = []
    step: Callable[..., Any] = backend.recognizer.step

    def counted(features: Tensor, streams: list[Any]) -> Any:
        sizes.append(len(streams))
        if gate is not None:
            assert gate.wait(10)
        return step(features, streams)

    backend.recognizer.step = counted  # type: ignore[method-assign]
    return sizes


def test_streams_are_stepped_together_and_decode_as_they_would_alone(stt: SpeechToText) -> None:
    audios = [load_audio(path) for path in RECORDINGS]
    expected = [[t.id for t in stt.recognizer.transcribe(stt.features(a))] for a in audios]

    async def run() -> tuple[list[list[int]], list[int]]:
        backend = CpuBackend(stt, max_streams=8, batch_window_s=5.0)  # only full batches step
        sizes = spy_on_steps(backend)
        streams = [await backend.open_stream([]) for _ in audios]

        async def one(stream: Any, frames: list[Tensor]) -> list[int]:
            tokens = []
            for frame in frames:
                tokens += [t.id for t in (await stream.step(frame)).final]
            tokens += [t.id for t in stream.finish()]
            await stream.close()  # the others' last frames no longer wait for this stream's
            return tokens

        tokens = await asyncio.gather(
            *(one(s, frames_of(stt, a)) for s, a in zip(streams, audios, strict=True))
        )
        backend.close()
        return list(tokens), sizes

    tokens, sizes = asyncio.run(run())
    assert tokens == expected
    shortest = min(len(frames_of(stt, a)) for a in audios)
    assert sizes[:shortest] == [3] * shortest, "while all three stream, every step takes all three"
    assert sum(sizes) == sum(len(frames_of(stt, a)) for a in audios)


def test_frames_that_come_during_a_step_wait_for_the_next_one(stt: SpeechToText) -> None:
    frame = frames_of(stt, load_audio(RECORDINGS[0]))[0]

    async def run() -> list[int]:
        backend = CpuBackend(stt, max_streams=8, batch_window_s=0.01)
        gate = threading.Event()
        sizes = spy_on_steps(backend, gate)
        first, second = await backend.open_stream([]), await backend.open_stream([])
        running = [asyncio.create_task(s.step(frame)) for s in (first, second)]
        await asyncio.sleep(0.05)  # the step of those two is running (held at the gate)
        late = await backend.open_stream([])
        held = asyncio.create_task(late.step(frame))
        await asyncio.sleep(0.05)  # its window ends while the step still runs
        assert sizes == [2] and not held.done()
        gate.set()
        await asyncio.gather(*running, held)
        backend.close()
        return sizes

    assert asyncio.run(run()) == [2, 1]


def test_a_stream_that_goes_away_during_a_step_leaves_the_others_served(stt: SpeechToText) -> None:
    frame = frames_of(stt, load_audio(RECORDINGS[0]))[0]

    async def run() -> None:
        backend = CpuBackend(stt, max_streams=8, batch_window_s=0.01)
        gate = threading.Event()
        spy_on_steps(backend, gate)
        leaving, staying = await backend.open_stream([]), await backend.open_stream([])
        gone = asyncio.create_task(leaving.step(frame))
        served = asyncio.create_task(staying.step(frame))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client hung up while its frame was in the step
        await leaving.close()
        gate.set()
        decoded = await served
        assert decoded.final == [] and gone.cancelled()
        assert (await staying.step(frame)).final == [], "the backend goes on stepping"
        backend.close()

    asyncio.run(run())


def test_frames_waiting_when_the_backend_stops_fail_with_a_reason(stt: SpeechToText) -> None:
    frame = frames_of(stt, load_audio(RECORDINGS[0]))[0]

    async def run() -> None:
        backend = CpuBackend(stt, max_streams=8, batch_window_s=5.0)
        waiting, _idle = await backend.open_stream([]), await backend.open_stream([])
        pending = asyncio.create_task(waiting.step(frame))
        await asyncio.sleep(0.02)
        backend.close()
        with pytest.raises(BackendError, match="stopped"):
            await pending
        with pytest.raises(BackendError, match="stopped"):
            await waiting.step(frame)

    asyncio.run(run())


def test_a_failed_step_fails_its_streams_and_the_next_step_runs(stt: SpeechToText) -> None:
    frame = frames_of(stt, load_audio(RECORDINGS[0]))[0]

    async def run() -> None:
        backend = CpuBackend(stt, max_streams=8, batch_window_s=0.01)
        stream = await backend.open_stream([])
        with pytest.raises(BackendError, match="model step failed"):
            await stream.step(torch.zeros(7))  # too few samples for a frame's features
        assert (await stream.step(frame)).final == []
        backend.close()

    asyncio.run(run())
