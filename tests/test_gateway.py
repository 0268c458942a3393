"""The gateway process (`gharial-gateway`) against transcribers.

Most tests use `FakeTranscriber`, an in-test gRPC servicer with deterministic answers, so the
gateway's own logic (one response per 60 ms frame, closes, failover with replay) is exactly
checkable: frame i of the test audio holds the sample value i, and the fake's text for it is the
word " w{i}", so the finals of a stream concatenated are " w0 w1 ..." whatever happens in between.
The end-to-end tests at the bottom run the real `gharial-transcriber --cpu-backend`.
"""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from gharial.balancer import LoadBalancer, WorkerRecord, WorkerRegistration
from gharial.cli.client import LiveTranscript
from gharial.gateway.auth import hash_key
from gharial.gateway.framing import FRAME_BYTES, FRAME_SAMPLES
from gharial.gateway.messages import Alternative, StreamResponse
from gharial.protos import transcriber_pb2, transcriber_pb2_grpc
from tests.redis_server import RedisServer
from tests.service_process import BIN, ServiceProcess, metric_value, running

SUBPROTOCOL = "stream.asr.api.myrtle.ai"
MODEL = "en-small"


# --- a deterministic transcriber -------------------------------------------------------------


class FakeTranscriber(transcriber_pb2_grpc.TranscriberServicer):
    """One response per frame: provisional text = the words since the last final, final every
    `period` frames of the call and after end of stream. `full`: answers RESOURCE_EXHAUSTED.
    `on_frame(index)` runs before each frame's response (a test kills the worker from it)."""

    def __init__(self, name: str, period: int = 5, full: bool = False) -> None:
        self.name = name
        self.period = period
        self.full = full
        self.configs: list[transcriber_pb2.StreamConfig] = []
        self.on_frame: Callable[[int], None] = lambda index: None

    def Transcribe(
        self, request_iterator: Iterator[transcriber_pb2.TranscribeRequest], context: grpc.ServicerContext
    ) -> Iterator[transcriber_pb2.TranscribeResponse]:
        config = next(request_iterator).config
        if config.model != MODEL:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown model {config.model!r}")
        if self.full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker full")
        self.configs.append(config)
        words: list[str] = []
        index = config.first_frame
        for request in request_iterator:
            if request.end_of_stream:
                yield response(index, words, final=True)
                return
            self.on_frame(index)
            words.append(f" w{int.from_bytes(request.audio[:2], 'little', signed=True)}")
            final = (index - config.first_frame + 1) % self.period == 0
            yield response(index, words, final)
            if final:
                words = []
            index += 1

    def GetWorkerInfo(
        self, request: transcriber_pb2.GetWorkerInfoRequest, context: grpc.ServicerContext
    ) -> transcriber_pb2.WorkerInfo:
        return transcriber_pb2.WorkerInfo(
            worker_id=self.name,
            backend="cpu",
            models=[MODEL],
            max_streams=8,
            streams_open=8 if self.full else 0,
        )


def response(index: int, words: list[str], final: bool) -> transcriber_pb2.TranscribeResponse:
    return transcriber_pb2.TranscribeResponse(
        start=index * 0.06,
        end=(index + 1) * 0.06,
        is_provisional=not final,
        alternatives=[transcriber_pb2.Alternative(transcript="".join(words), confidence=0.9)],
        frame_index=index,
    )


@dataclass
class FakeWorker:
    servicer: FakeTranscriber
    server: grpc.Server
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Drop every call at once, like a crashed process."""
        self.server.stop(None)


@contextmanager
def fake_worker(name: str, period: int = 5, full: bool = False) -> Iterator[FakeWorker]:
    servicer = FakeTranscriber(name, period, full)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    transcriber_pb2_grpc.add_TranscriberServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeWorker(servicer, server, port)
    finally:
        server.stop(None)


# --- the gateway and a client ----------------------------------------------------------------


@contextmanager
def gateway(*args: str) -> Iterator[ServiceProcess]:
    with running([str(BIN / "gharial-gateway"), "--port", "0", *args]) as service:
        yield service


def audio(frames: int) -> bytes:
    """`frames` 60 ms frames; every sample of frame i is i."""
    return np.repeat(np.arange(frames, dtype="<i2"), FRAME_SAMPLES).tobytes()


def words(frames: int) -> str:
    return "".join(f" w{i}" for i in range(frames))


def chunked(data: bytes, rng: random.Random, largest: int = 3 * FRAME_BYTES) -> list[bytes]:
    chunks, start = [], 0
    while start < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[start : start + size])
        start += size
    return chunks


@dataclass
class Result:
    responses: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    reason: str | None = None
    subprotocol: str | None = None

    @property
    def transcript(self) -> str:
        return "".join(r["alternatives"][0]["transcript"] for r in self.responses if not r["is_provisional"])


def url(service: ServiceProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{service.grpc_port}/asr/v0.1/stream" + (f"?{query}" if query else "")


def stream(
    service: ServiceProcess,
    chunks: Sequence[bytes | str],
    query: str = "",
    headers: dict[str, str] | None = None,
    subprotocols: list[Subprotocol] | None = None,
    midway: Callable[[], None] | None = None,
    pause_s: float = 0.0,
    end: bool = True,
) -> Result:
    """Send `chunks` (then EOS) from a thread while reading every response until the Close;
    `midway` runs once half the chunks are sent and a response has arrived."""
    result = Result()
    first_response = threading.Event()
    with connect(
        url(service, query),
        additional_headers=headers,
        subprotocols=subprotocols,
        proxy=None,
        open_timeout=10,
    ) as ws:
        result.subprotocol = ws.subprotocol

        def send() -> None:
            try:
                for i, chunk in enumerate(chunks):
                    if midway is not None and i == len(chunks) // 2:
                        first_response.wait(10)
                        midway()
                    ws.send(chunk)
                    time.sleep(pause_s)
                if end:
                    ws.send(b"")
            except ConnectionClosed:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for message in ws:
                result.responses.append(json.loads(message))
                first_response.set()
        except ConnectionClosed:
            pass
        sender.join(10)
        result.code, result.reason = ws.close_code, ws.close_reason
    return result


def get(service: ServiceProcess, path: str) -> tuple[int, str]:
    reply = httpx.get(f"http://127.0.0.1:{service.grpc_port}{path}", timeout=10)
    return reply.status_code, reply.text


def assert_complete(result: Result, frames: int) -> None:
    """One response per frame and one after end of stream, in order, the last final; normal Close."""
    assert result.code == 1000, result.reason
    assert [round(r["end"] / 0.06) - 1 for r in result.responses] == list(range(frames + 1))
    assert not result.responses[-1]["is_provisional"]
    assert result.transcript == words(frames)


# --- static transcribers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[FakeWorker, FakeWorker]]:
    with fake_worker("a") as a, fake_worker("b") as b:
        yield a, b


@pytest.fixture(scope="module")
def gw(workers: tuple[FakeWorker, FakeWorker]) -> Iterator[ServiceProcess]:
    a, b = workers
    args = ["--transcriber", a.address, "--transcriber", b.address]
    with gateway(*args, "--idle-timeout-s", "1", "--max-frame-bytes", "65536") as service:
        yield service


def test_one_response_per_frame_then_final_and_normal_close(gw: ServiceProcess) -> None:
    result = stream(gw, [audio(23)])
    assert_complete(result, 23)
    assert result.subprotocol is None
    first = result.responses[0]
    assert set(first) == {"start", "end", "is_provisional", "alternatives"}
    assert first["alternatives"] == [{"transcript": " w0", "confidence": 0.9}]
    assert first["end"] == pytest.approx(0.06)


def test_subprotocol_accepted_when_offered(gw: ServiceProcess) -> None:
    result = stream(gw, [audio(3)], subprotocols=[Subprotocol(SUBPROTOCOL)])
    assert result.subprotocol == SUBPROTOCOL
    assert_complete(result, 3)


def test_random_chunkings_give_the_same_transcript(gw: ServiceProcess) -> None:
    data = audio(30)
    for seed in range(4):
        assert_complete(stream(gw, list(chunked(data, random.Random(seed)))), 30)
    assert_complete(
        stream(gw, [data[i : i + 1] for i in range(0, 4 * FRAME_BYTES)] + [data[4 * FRAME_BYTES :]]), 30
    )


def test_tail_is_padded_to_a_frame(gw: ServiceProcess) -> None:
    data = audio(5)[: 4 * FRAME_BYTES + 3]  # 3 bytes into frame 4: one and a half samples
    result = stream(gw, [data])
    assert_complete(result, 5)


def test_empty_stream_gets_one_final(gw: ServiceProcess) -> None:
    result = stream(gw, [])
    assert result.code == 1000
    assert [r["is_provisional"] for r in result.responses] == [False]


@pytest.mark.parametrize(
    "query",
    [
        "content_type=audio/wav",
        "content_type=audio/x-raw;format=F32LE;channels=1;rate=16000",
        "content_type=audio/x-raw;format=S16LE;channels=1;rate=8000",
        "content_type=audio/x-raw;format=S16LE;channels=2;rate=16000",
        "content_type=audio/x-raw",
        "alternatives=two",
        "alternatives=0",
        "alternatives=11",
        "model=nope",  # the transcriber's INVALID_ARGUMENT
        "lang=not_a_tag",
        "colour=blue",
        "model=%ff",
    ],
)
def test_invalid_parameters_close_with_400(gw: ServiceProcess, query: str) -> None:
    result = stream(gw, [audio(2)], query=query)
    assert result.code == 1008
    assert result.reason is not None and result.reason.startswith("400 "), result.reason
    assert result.responses == []


def test_text_frame_closes_with_1003(gw: ServiceProcess) -> None:
    result = stream(gw, ["hello"], end=False)
    assert result.code == 1003
    assert result.reason is not None and "binary" in result.reason


def test_oversize_frame_closes_with_1009(gw: ServiceProcess) -> None:
    result = stream(gw, [b"\0" * 65538], end=False)
    assert result.code == 1009


def test_stalled_client_is_closed(gw: ServiceProcess) -> None:
    started = time.monotonic()
    result = stream(gw, [audio(1)], end=False)
    assert result.code == 1008
    assert result.reason is not None and result.reason.startswith("408 ")
    assert 0.9 < time.monotonic() - started < 10
    assert len(result.responses) == 1  # the frame it sent was answered before the close


def test_probes_and_metrics(gw: ServiceProcess) -> None:
    assert get(gw, "/healthz") == (200, '{"status":"ok"}')
    status, body = get(gw, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = get(gw, "/docs")
    assert status == 200 and "swagger" in body.lower()
    stream(gw, [audio(4)])
    text = get(gw, "/metrics")[1]
    assert (metric_value(text, "gharial_gateway_streams_total", outcome="completed") or 0) >= 1
    assert (metric_value(text, "gharial_gateway_audio_bytes_total") or 0) >= 4 * FRAME_BYTES
    assert (metric_value(text, "gharial_gateway_frame_latency_seconds_count") or 0) >= 5
    assert metric_value(text, "gharial_gateway_connections_open") == 0


def test_readyz_without_reachable_transcribers() -> None:
    with gateway("--transcriber", "127.0.0.1:1") as service:
        status, body = get(service, "/readyz")
        assert status == 503 and json.loads(body) == {
            "ready": False,
            "detail": "0 of 1 transcribers have room",
        }


def test_all_workers_full_closes_with_503() -> None:
    with (
        fake_worker("a", full=True) as a,
        fake_worker("b", full=True) as b,
        gateway("--transcriber", a.address, "--transcriber", b.address) as service,
    ):
        result = stream(service, [audio(2)])
        assert result.code == 1013
        assert result.reason is not None and result.reason.startswith("503 ")
        text = get(service, "/metrics")[1]
        assert metric_value(text, "gharial_gateway_rejects_total", code="503") == 1
        assert get(service, "/readyz")[0] == 503


def test_connection_limit_closes_with_503(workers: tuple[FakeWorker, FakeWorker]) -> None:
    with (
        gateway("--transcriber", workers[0].address, "--max-connections", "1") as service,
        connect(url(service), proxy=None) as first,
    ):
        first.send(audio(1))
        json.loads(first.recv(10))  # the first stream is open and answered
        result = stream(service, [audio(1)])
        assert result.code == 1013
        assert result.reason == "503 maximum number of simultaneous connections reached"
        first.send(b"")
        assert len(list(first)) == 1  # its final; then the normal Close
        assert_complete(stream(service, [audio(2)]), 2)


def test_api_keys_when_configured(workers: tuple[FakeWorker, FakeWorker], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the CI's key\n{hash_key('ci-key')}\n")
    args = ["--api-key-hash", hash_key("s3cret"), "--api-keys-file", str(keys_file)]
    with gateway("--transcriber", workers[0].address, *args) as service:
        missing = stream(service, [audio(1)])
        assert (missing.code, (missing.reason or "")[:4]) == (1008, "401 ")
        wrong = stream(service, [audio(1)], headers={"X-API-Key": "guess"})
        assert (wrong.code, wrong.reason) == (1008, "401 API key not accepted")
        assert_complete(stream(service, [audio(2)], headers={"Authorization": "Bearer s3cret"}), 2)
        assert_complete(stream(service, [audio(2)], headers={"X-API-Key": "s3cret"}), 2)
        assert_complete(stream(service, [audio(2)], query="api_key=s3cret"), 2)
        assert_complete(stream(service, [audio(2)], query="api_key=ci-key"), 2)
        assert get(service, "/healthz")[0] == 200  # probes need no key


def test_sigterm_drains_open_streams_then_exits_0(workers: tuple[FakeWorker, FakeWorker]) -> None:
    with gateway("--transcriber", workers[0].address) as service:
        refused: list[Result] = []

        def terminate() -> None:
            service.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused.append(stream(service, [audio(1)]))
            assert get(service, "/readyz")[0] == 503

        frames = [audio(20)[i : i + FRAME_BYTES] for i in range(0, 20 * FRAME_BYTES, FRAME_BYTES)]
        assert_complete(stream(service, frames, midway=terminate, pause_s=0.02), 20)
        assert (refused[0].code, refused[0].reason) == (1013, "503 gateway shutting down")
        assert service.process.wait(10) == 0


def test_worker_killed_mid_stream_replays_on_another_without_loss() -> None:
    """A finalises every 5 frames and dies on frame 12; B finalises every 2 frames of its call,
    so its final for frame 11 (already answered by A) must travel with the next response."""
    with fake_worker("a", period=5) as a, fake_worker("b", period=2) as b:

        def die(index: int) -> None:
            if index == 12:
                time.sleep(0.3)  # let the responses so far reach the gateway
                a.kill()

        a.servicer.on_frame = die
        with gateway("--transcriber", a.address, "--transcriber", b.address) as service:
            result = stream(service, chunked(audio(40), random.Random(1)))
            assert_complete(result, 40)
            assert [c.first_frame for c in b.servicer.configs] == [10]  # after A's final for frame 9
            assert [c.continues_text for c in a.servicer.configs + b.servicer.configs] == [False, True]
            assert [c.stream_id for c in b.servicer.configs] == [c.stream_id for c in a.servicer.configs]
            finals = [round(r["end"] / 0.06) - 1 for r in result.responses if not r["is_provisional"]]
            assert finals[:3] == [4, 9, 12]  # B's final for frame 11 went out with frame 12's response
            joined = result.responses[12]
            assert joined["alternatives"][0]["transcript"] == " w10 w11"
            assert (joined["start"], joined["end"]) == pytest.approx((0.66, 0.78))
            text = get(service, "/metrics")[1]
            assert (
                sum(
                    metric_value(text, "gharial_gateway_replays_total", status=s) or 0
                    for s in ("UNAVAILABLE", "CANCELLED")
                )
                == 1
            )
            assert service.events("stream_moving")[0]["replay_from"] == 10


def test_worker_gone_for_good_ends_the_stream_with_503() -> None:
    with fake_worker("a") as a:
        a.servicer.on_frame = lambda index: a.kill() if index == 3 else None
        with gateway("--transcriber", a.address, "--failover-timeout-s", "1") as service:
            result = stream(service, [audio(10)])
            assert result.code == 1013
            assert result.reason is not None and result.reason.startswith("503 transcriber failed")


# --- the Redis load balancer -----------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@contextmanager
def registered(
    redis_server: RedisServer, worker: FakeWorker, capacity: int = 4
) -> Iterator[WorkerRegistration]:
    record = WorkerRecord(
        worker_id=worker.servicer.name, address=worker.address, models=[MODEL], capacity=capacity
    )
    registration = WorkerRegistration(redis_server.url, record)
    registration.start()
    try:
        yield registration
    finally:
        registration.stop()


def test_balanced_streams_unknown_models_capacity_and_leases(redis_server: RedisServer) -> None:
    balancer = LoadBalancer(redis_server.url)
    with (
        fake_worker("a") as a,
        registered(redis_server, a, capacity=1),
        gateway("--redis-url", redis_server.url, "--lease-s", "1") as service,
    ):
        assert get(service, "/readyz")[0] == 200
        assert_complete(stream(service, [audio(7)], query=f"model={MODEL}"), 7)
        unknown = stream(service, [audio(1)], query="model=fr-large")
        assert unknown.code == 1008
        assert unknown.reason == "400 model 'fr-large' is not served (served: en-small)"
        with connect(url(service), proxy=None) as first:  # takes the only slot
            first.send(audio(1))
            json.loads(first.recv(10))
            time.sleep(2.0)  # two leases long: only renewals keep the claim
            assert balancer.claim_count("a") == 1
            full = stream(service, [audio(1)])
            assert full.code == 1013 and full.reason == "503 no transcriber has room for model 'en-small'"
            first.send(b"")
            list(first)
        assert balancer.claim_count("a") == 0  # released at the end of the stream
        assert_complete(stream(service, [audio(2)]), 2)
        with connect(url(service), proxy=None) as gone:  # a client that just goes away
            gone.send(audio(1))
            json.loads(gone.recv(10))
        deadline = time.monotonic() + 5
        while balancer.claim_count("a") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert balancer.claim_count("a") == 0
    balancer.close()


def test_balanced_failover_to_another_worker(redis_server: RedisServer) -> None:
    with (
        fake_worker("a") as a,
        fake_worker("b") as b,
        registered(redis_server, a) as a_registration,
        registered(redis_server, b),
        gateway("--redis-url", redis_server.url) as service,
    ):

        def die(index: int) -> None:
            if index == 7:
                a_registration.stop()
                a.kill()

        a.servicer.on_frame = die  # deregistered and gone, like a crashed worker whose TTL lapsed
        assert_complete(stream(service, [audio(20)]), 20)  # "a" is chosen first: lowest ID
        # b replays from the last final the gateway had received from a: frame 4's (so from 5),
        # or none when a died before that response came through (a loaded machine: from 0)
        replay_from = service.events("stream_moving")[0]["replay_from"]
        assert replay_from in (0, 5)
        assert [c.first_frame for c in b.servicer.configs] == [replay_from]


def test_redis_outage_refuses_new_streams_but_not_open_ones(redis_server: RedisServer) -> None:
    with (
        fake_worker("a") as a,
        registered(redis_server, a),
        gateway("--redis-url", redis_server.url, "--lease-s", "1") as service,
    ):
        frames = [audio(20)[i : i + FRAME_BYTES] for i in range(0, 20 * FRAME_BYTES, FRAME_BYTES)]
        result = stream(service, frames, midway=redis_server.stop, pause_s=0.05)
        assert result.code == 1000
        assert len(result.responses) == 21
        refused = stream(service, [audio(1)])
        assert refused.code == 1013 and refused.reason == "503 load balancer unreachable"
        assert get(service, "/readyz")[0] == 503


# --- the simple client -----------------------------------------------------------------------


def test_simple_client_prints_the_transcript(gw: ServiceProcess, tmp_path: Path) -> None:
    wav = tmp_path / "frames.wav"
    soundfile.write(wav, np.frombuffer(audio(12), dtype="<i2"), 16000, subtype="PCM_16")
    command = [str(BIN / "gharial"), "client", str(wav), "--port", str(gw.grpc_port), "--no-realtime"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == words(12).lstrip() + "\n"

    bad = subprocess.run([*command, "--alternatives", "99"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "400 alternatives" in bad.stderr


def test_live_transcript_rewrites_the_provisional_tail_in_place() -> None:
    def response(text: str, final: bool) -> StreamResponse:
        alternatives = [Alternative(transcript=text, confidence=1.0)]
        return StreamResponse(start=0, end=0, is_provisional=not final, alternatives=alternatives)

    out = io.StringIO()
    live = LiveTranscript(out, live=True, width=20)
    live.show(response(" hello", final=False))
    assert out.getvalue().endswith("\r\x1b[K\x1b[2mhello\x1b[0m")
    for text, final in [(" hello there", True), (" general", False), (" general kenobi you are", True)]:
        live.show(response(text, final))
    live.finish()
    lines = [line.rpartition("\x1b[K")[2] for line in out.getvalue().split("\n")]
    assert lines == ["hello there general", "kenobi you are", ""]  # wrapped at a space, then rewritten

    plain = io.StringIO()
    piped = LiveTranscript(plain, live=False, width=20)
    for text, final in [(" a", False), (" a b", True), (" c", False), (" c", True)]:
        piped.show(response(text, final))
    piped.finish()
    assert plain.getvalue() == "a b c\n"


# --- the real transcriber --------------------------------------------------------------------

TRANSCRIBER = BIN / "gharial-transcriber"
SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev"
needs_transcriber = pytest.mark.skipif(
    not TRANSCRIBER.exists(), reason="gharial-transcriber is not installed"
)


def speech_pcm() -> bytes:
    manifest = json.loads((SPEECH / "manifest.json").read_text())
    path = SPEECH / manifest[0]["files"][0]["fname"]
    from gharial.audio import float_to_pcm16, load_audio

    return float_to_pcm16(load_audio(path))


@contextmanager
def transcriber(*args: str) -> Iterator[ServiceProcess]:
    with running([str(TRANSCRIBER), "--cpu-backend", "--port", "0", "--metrics-port", "0", *args]) as service:
        yield service


@needs_transcriber
def test_real_transcriber_end_to_end(redis_server: RedisServer) -> None:
    """The transcriber registers itself in Redis; the gateway finds it through the balancer."""
    if not (SPEECH / "manifest.json").exists():
        pytest.skip("speech-dev data not found")
    pcm = speech_pcm()
    frames = -(-len(pcm) // FRAME_BYTES)
    with (
        transcriber("--redis-url", redis_server.url),
        gateway("--redis-url", redis_server.url) as service,
    ):
        result = stream(service, chunked(pcm, random.Random(0), largest=4000))
        assert result.code == 1000, result.reason
        assert len(result.responses) == frames + 1
        assert not result.responses[-1]["is_provisional"]
        again = stream(service, [pcm])
        assert again.transcript == result.transcript  # any chunking, the same words


@needs_transcriber
def test_real_transcriber_killed_mid_stream() -> None:
    if not (SPEECH / "manifest.json").exists():
        pytest.skip("speech-dev data not found")
    pcm = speech_pcm()
    frames = -(-len(pcm) // FRAME_BYTES)
    chunks = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    with (
        transcriber() as first,
        transcriber() as second,
        gateway("--transcriber", first.address, "--transcriber", second.address) as service,
    ):
        result = stream(service, chunks, midway=first.process.kill, pause_s=0.01)
        assert result.code == 1000, result.reason
        ends = [round(r["end"] / 0.06) for r in result.responses]
        assert ends[:frames] == list(range(1, frames + 1)) and len(ends) == frames + 1
        assert not result.responses[-1]["is_provisional"]
        assert service.events("stream_moving")
