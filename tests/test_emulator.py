"""The emulated card (gharial.accelerator.card) and its gRPC service (gharial-emulator).

The card must behave like the FPGA card to its client: bounded state memory, one frame in flight
per stream, frames batched, results equal to the program's arithmetic whatever shares a batch,
simulated timing on every result, and clean errors for every misuse. The service tests run the
real process on loopback, with health checks, /metrics and SIGTERM.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from gharial.accelerator.card import Card, CardError, FrameErrorCode, FrameOutcome
from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.executor import ProgramExecutor
from gharial.accelerator.profile import CardProfile, load_profile
from gharial.accelerator.program import Program, ProgramError
from gharial.accelerator.wire import iter_chunks
from gharial.asr.config import ModelConfig
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.audio import load_audio
from gharial.protos import accelerator_pb2 as pb
from gharial.protos import accelerator_pb2_grpc, program_pb2

from .conftest import SPEECH_DEV, emitting_model
from .service_process import BIN, metric_value, running
from .test_program import checkpoint_of


@pytest.fixture(scope="module")
def program(tiny_tokenizer_bytes: bytes) -> Program:
    return compile_checkpoint(checkpoint_of(emitting_model(acoustic_gain=400), tiny_tokenizer_bytes))


@pytest.fixture(scope="module")
def frames(tiny_config: ModelConfig, speech_dev_manifest: list[dict[str, Any]]) -> list[np.ndarray]:
    """Per utterance: its 60 ms frames of features, [frames, 2·F] float32 (real speech)."""
    audio = [load_audio(SPEECH_DEV / entry["files"][0]["fname"]) for entry in speech_dev_manifest[:3]]
    raw = FeatureExtractor(tiny_config.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(a) for a in audio]))
    extractor = FeatureExtractor(tiny_config.features, stats)
    out = []
    for a in audio:
        features = extractor(a[: 16000 * 3])  # 3 s each keeps the tests fast
        out.append(features.reshape(len(features) // 2, -1).numpy().astype("<f4"))
    return out


@pytest.fixture
def profile() -> CardProfile:
    return load_profile("speedster7t")


def make_card(profile: CardProfile, program: Program, **options: Any) -> Card:
    card = Card("card-test", profile, **options)
    card.load_program(program.to_bytes())
    return card


class Results:
    """Collects a card's deliveries; `get` waits for the next one."""

    def __init__(self) -> None:
        self.queue: queue.Queue[FrameOutcome] = queue.Queue()

    def __call__(self, outcome: FrameOutcome) -> None:
        self.queue.put(outcome)

    def get(self) -> FrameOutcome:
        return self.queue.get(timeout=30)


def expected_tokens(program: Program, frames: np.ndarray) -> list[list[int]]:
    """The program's arithmetic on one stream alone (the executor, no card around it)."""
    executor = ProgramExecutor(program)
    state = executor.new_state(1)
    executor.reset(state, [0])
    features = torch.from_numpy(frames).reshape(len(frames), 2, -1)
    return [executor.run_batch(state, [0], f[None], [30]).tokens[0] for f in features]


def test_concurrent_streams_get_what_each_gets_alone(
    profile: CardProfile, program: Program, frames: list[np.ndarray]
) -> None:
    card = make_card(profile, program)
    try:
        streams = [card.open_stream() for _ in frames]
        results = {s: Results() for s in streams}
        got: dict[int, list[list[int]]] = {s: [] for s in streams}
        batch_sizes = []
        for t in range(max(len(f) for f in frames)):
            live = [(s, f) for s, f in zip(streams, frames, strict=True) if t < len(f)]
            for s, f in live:
                card.submit(s, t, f[t].tobytes(), False, results[s])
            for s, _ in live:
                outcome = results[s].get()
                assert outcome.error == FrameErrorCode.NONE, outcome.message
                assert outcome.frame_index == t and outcome.batch_cycles > 0
                assert outcome.simulated_latency_ms > 0
                got[s].append(outcome.tokens)
                batch_sizes.append(outcome.batch_size)
        for s, f in zip(streams, frames, strict=True):
            assert got[s] == expected_tokens(program, f)
        assert any(t for per_frame in got.values() for t in per_frame), "the test model said nothing"
        assert max(batch_sizes) > 1, "frames of different streams were never batched together"
    finally:
        card.shutdown()


def test_misuse_is_refused_with_the_right_code(
    profile: CardProfile, program: Program, frames: list[np.ndarray]
) -> None:
    card = Card("card-test", profile)
    results = Results()
    try:
        card.submit(1, 0, b"", False, results)
        assert results.get().error == FrameErrorCode.NO_PROGRAM
        with pytest.raises(CardError, match="no program") as no_program:
            card.open_stream()
        assert no_program.value.code == "FAILED_PRECONDITION"

        card.load_program(program.to_bytes())
        stream = card.open_stream()
        good = frames[0][0].tobytes()
        card.submit(stream + 100, 0, good, False, results)
        assert results.get().error == FrameErrorCode.UNKNOWN_STREAM
        card.submit(stream, 1, good, False, results)
        assert results.get().error == FrameErrorCode.OUT_OF_ORDER
        card.submit(stream, 0, good[:-4], False, results)
        bad_size = results.get()
        assert bad_size.error == FrameErrorCode.BAD_FEATURES and "feature bytes" in bad_size.message
        nan = np.full(len(frames[0][0]), np.nan, dtype="<f4").tobytes()
        card.submit(stream, 0, nan, False, results)
        assert results.get().error == FrameErrorCode.BAD_FEATURES

        # a second frame while one is in flight: hold the batcher so the first is still waiting
        with card._lock:
            card.submit(stream, 0, good, False, results)
            card.submit(stream, 1, good, False, results)
            second = results.get()
        assert second.error == FrameErrorCode.IN_FLIGHT and "in flight" in second.message
        assert results.get().error == FrameErrorCode.NONE  # the first still runs

        assert card.close_stream(stream) == 1
        card.submit(stream, 1, good, False, results)
        assert results.get().error == FrameErrorCode.UNKNOWN_STREAM
        with pytest.raises(CardError) as closed:
            card.close_stream(stream)
        assert closed.value.code == "NOT_FOUND"
    finally:
        card.shutdown()


def test_state_memory_bounds_the_streams(profile: CardProfile, program: Program) -> None:
    per_stream = program.info().state_bytes_per_stream
    card = make_card(profile.model_copy(update={"state_memory_bytes": 3 * per_stream + 10}), program)
    try:
        assert card.max_streams == 3
        streams = [card.open_stream() for _ in range(3)]
        with pytest.raises(CardError, match="state memory is full") as full:
            card.open_stream()
        assert full.value.code == "RESOURCE_EXHAUSTED"
        assert card.state_memory_used == 3 * per_stream
        card.close_stream(streams[0])
        card.open_stream()  # the freed row is reused
    finally:
        card.shutdown()


def test_closing_a_stream_answers_its_waiting_frame(
    profile: CardProfile, program: Program, frames: list[np.ndarray]
) -> None:
    card = make_card(profile, program)
    results = Results()
    try:
        stream = card.open_stream()
        with card._lock:  # the batcher cannot take the frame before the close
            card.submit(stream, 0, frames[0][0].tobytes(), False, results)
            card.close_stream(stream)
        outcome = results.get()
        assert outcome.error == FrameErrorCode.STREAM_CLOSED
    finally:
        card.shutdown()


def test_corrupt_programs_are_refused_and_the_old_one_stays(
    profile: CardProfile, program: Program, frames: list[np.ndarray]
) -> None:
    card = make_card(profile, program)
    try:
        stream = card.open_stream()
        data = program.to_bytes()
        with pytest.raises(ProgramError, match="truncated"):
            card.load_program(data[: len(data) // 2])
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        with pytest.raises(ProgramError):
            card.load_program(bytes(flipped))
        assert card.streams_open == 1  # nothing was disturbed
        results = Results()
        card.submit(stream, 0, frames[0][0].tobytes(), False, results)
        assert results.get().error == FrameErrorCode.NONE
    finally:
        card.shutdown()


def test_timing_only_mode_reports_time_without_tokens(profile: CardProfile, program: Program) -> None:
    card = make_card(profile, program, mode="timing_only")
    results = Results()
    try:
        streams = [card.open_stream() for _ in range(20)]
        with card._lock:
            for s in streams:
                card.submit(s, 0, b"", False, results)
        outcomes = [results.get() for _ in streams]
        assert {o.error for o in outcomes} == {FrameErrorCode.NONE}
        assert {o.batch_size for o in outcomes} == {20}
        assert all(o.tokens == [] and o.batch_cycles > 0 for o in outcomes)
        assert all(o.simulated_latency_ms >= profile.host_overhead_ms for o in outcomes)
    finally:
        card.shutdown()


def test_paced_results_arrive_at_their_simulated_time(profile: CardProfile, program: Program) -> None:
    slow = profile.model_copy(update={"host_overhead_ms": 150.0})
    card = make_card(slow, program, mode="timing_only", paced=True)
    results = Results()
    try:
        stream = card.open_stream()
        sent = time.monotonic()
        card.submit(stream, 0, b"", False, results)
        outcome = results.get()
        waited_ms = 1000 * (time.monotonic() - sent)
        assert outcome.simulated_latency_ms >= 150
        assert waited_ms >= 0.9 * outcome.simulated_latency_ms
    finally:
        card.shutdown()


# --- the service ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program_file(program: Program, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("program") / "tiny.prog"
    program.save(path)
    return path


def emulator_command(*args: str) -> list[str]:
    return [str(BIN / "gharial-emulator"), "--port", "0", "--metrics-port", "0", *args]


class PacedClient:
    """Sends a stream's frames one at a time on a RunFrames call, the next only after the previous
    frame's result (the card allows one frame in flight), like a transcriber does."""

    def __init__(
        self, stub: accelerator_pb2_grpc.AcceleratorStub, stream_id: int, frames: np.ndarray
    ) -> None:
        self.answered: queue.Queue[None] = queue.Queue()
        self.stop = threading.Event()
        self.call = stub.RunFrames(self._requests(stream_id, frames))

    def _requests(self, stream_id: int, frames: np.ndarray) -> Iterator[pb.FrameRequest]:
        for t, f in enumerate(frames):
            if t:
                self.answered.get(timeout=30)
            yield pb.FrameRequest(stream_id=stream_id, frame_index=t, features=f.tobytes())
        self.stop.wait(30)  # keeps the call open (no half-close) until told

    def results(self, n: int) -> list[pb.FrameResult]:
        out = []
        for _ in range(n):
            out.append(next(self.call))
            self.answered.put(None)
        return out


def test_service_runs_streams_and_reports(
    program: Program, program_file: Path, frames: list[np.ndarray]
) -> None:
    with running(emulator_command("--card-id", "card-7", "--program", str(program_file))) as service:
        assert service.health("gharial.v1.Accelerator") == health_pb2.HealthCheckResponse.SERVING
        with service.channel() as channel:
            stub = accelerator_pb2_grpc.AcceleratorStub(channel)
            info = stub.GetCardInfo(pb.GetCardInfoRequest())
            assert info.card_id == "card-7" and info.program.program_sha256 == program.sha256
            assert info.mode == pb.CARD_MODE_COMPUTE and info.max_streams > 0
            stream_id = stub.OpenStream(pb.OpenStreamRequest()).stream_id
            client = PacedClient(stub, stream_id, frames[0])
            results = client.results(len(frames[0]))
            client.stop.set()
            assert list(client.call) == []  # the call ends once the client half-closes
            assert [r.frame_index for r in results] == list(range(len(frames[0])))
            assert [list(r.tokens) for r in results] == expected_tokens(program, frames[0])
            assert all(r.batch_cycles > 0 and not r.error.code for r in results)
            assert stub.CloseStream(pb.CloseStreamRequest(stream_id=stream_id)).frames == len(frames[0])
            with pytest.raises(grpc.RpcError) as unknown:
                stub.CloseStream(pb.CloseStreamRequest(stream_id=stream_id))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            bad = program.to_bytes()[:1000]
            with pytest.raises(grpc.RpcError) as rejected:
                stub.LoadProgram(program_pb2.ProgramChunk(data=c) for c in iter_chunks(bad, 300))
            assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "truncated" in (rejected.value.details() or "")
        metrics = service.metrics()
        assert metric_value(metrics, "gharial_card_frames_total", card_id="card-7", outcome="ok") == len(
            frames[0]
        )
        assert metric_value(metrics, "gharial_card_streams_open", card_id="card-7") == 0
        assert (metric_value(metrics, "gharial_card_simulated_cycles_total", card_id="card-7") or 0) > 0
        assert service.terminate() == 0


def test_sigterm_ends_open_streams_with_a_status(program_file: Path, frames: list[np.ndarray]) -> None:
    with running(emulator_command("--card-id", "card-8", "--program", str(program_file))) as service:
        channel = service.channel()
        stub = accelerator_pb2_grpc.AcceleratorStub(channel)
        stream_id = stub.OpenStream(pb.OpenStreamRequest()).stream_id
        client = PacedClient(stub, stream_id, frames[0][:5])
        received = client.results(5)
        assert [r.frame_index for r in received] == list(range(5))
        assert service.terminate() == 0, "\n".join(service.lines[-40:])
        with pytest.raises(grpc.RpcError) as ended:
            next(client.call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        client.stop.set()
        channel.close()
        assert service.events("stream_closed"), "the open stream was not closed on shutdown"


def test_service_refuses_a_corrupt_program_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prog"
    bad.write_bytes(b"not a program at all")

    done = subprocess.run(
        emulator_command("--card-id", "card-9", "--program", str(bad)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "bad.prog" in done.stderr and "program" in done.stderr


def test_state_memory_is_allocated_as_streams_open(
    profile: CardProfile, program: Program, frames: list[np.ndarray]
) -> None:
    card = make_card(profile, program)
    results = Results()
    try:
        assert card.max_streams > 10_000  # the profile's memory holds far more than is allocated
        streams = [card.open_stream() for _ in range(150)]  # past the first allocation (64 rows)
        expected = expected_tokens(program, frames[0][:1])[0]
        for s in (streams[0], streams[-1]):
            card.submit(s, 0, frames[0][0].tobytes(), False, results)
            assert results.get().tokens == expected
        card.close_stream(streams[3])
        card.open_stream()  # reuses the closed row
        assert card.streams_open == 150
    finally:
        card.shutdown()
