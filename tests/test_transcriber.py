"""The transcriber (gharial-transcriber) as deployed: real processes on loopback, real speech.

The bundled model is undertrained, so its transcripts are mostly wrong; what is checked is that a
stream gets exactly what the same backend gives offline on the same audio: `Recognizer.transcribe`
for the CPU backend, the program's arithmetic (the executor) for the accelerator backend. Plus the
response contract (one response per frame, finals that concatenate into the transcript, ranked
alternatives), refusals, metrics, health, licences, Redis registration and draining on SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.executor import ProgramExecutor
from gharial.accelerator.program import Program
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.base import Token
from gharial.asr.features import FeatureExtractor
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.pipeline import SpeechToText, bundled_checkpoint, tokens_to_text
from gharial.asr.streaming import StreamingConfig
from gharial.asr.tokenizer import Tokenizer
from gharial.audio import float_to_pcm16, load_audio, pcm16_to_float
from gharial.balancer import LoadBalancer
from gharial.licensing import generate_keys
from gharial.protos import transcriber_pb2 as pb
from gharial.protos import transcriber_pb2_grpc
from gharial.transcription.transcript import Transcript

from .conftest import SPEECH_DEV
from .redis_server import RedisServer
from .service_process import BIN, ServiceProcess, metric_value, running
from .test_license import issue

FRAME_BYTES = 1920
SERVICE = "gharial.v1.Transcriber"
# Short state-reset segments, so that 2-3 s clips cross several resets.
RESETS = StreamingConfig(sr_segment_s=1.2, sr_overlap_s=0.36)
RESET_FLAGS = ["--sr-segment", "1.2", "--sr-overlap", "0.36"]


def transcriber(*args: str) -> list[str]:
    return [str(BIN / "gharial-transcriber"), "--port", "0", "--metrics-port", "0", *args]


@pytest.fixture(scope="module")
def checkpoint() -> HardwareCheckpoint:
    return HardwareCheckpoint.load(bundled_checkpoint())


@pytest.fixture(scope="module")
def clips(speech_dev_manifest: list[dict[str, Any]]) -> list[bytes]:
    """Three utterances as the gateway sends them: 16 kHz S16LE."""
    return [float_to_pcm16(load_audio(SPEECH_DEV / e["files"][0]["fname"])) for e in speech_dev_manifest[:3]]


def frames_of(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def requests(
    config: pb.StreamConfig, pcm: bytes, pause_at: int = 0, gate: threading.Event | None = None
) -> Iterator[pb.TranscribeRequest]:
    """Config, the audio frame by frame, end of stream; with a gate, frames from `pause_at` on wait for it."""
    yield pb.TranscribeRequest(config=config)
    for i, frame in enumerate(frames_of(pcm)):
        if gate is not None and i == pause_at:
            gate.wait(60)
        yield pb.TranscribeRequest(audio=frame)
    yield pb.TranscribeRequest(end_of_stream=True)


def finals(responses: list[pb.TranscribeResponse]) -> str:
    """The whole transcript: the final responses' text, concatenated exactly as they are."""
    return "".join(r.alternatives[0].transcript for r in responses if not r.is_provisional)


def check_contract(responses: list[pb.TranscribeResponse], pcm: bytes, first_frame: int = 0) -> None:
    """One response per frame, in order, then the final one; spans on the stream's timeline."""
    n = len(frames_of(pcm))
    assert [r.frame_index for r in responses] == list(range(first_frame, first_frame + n + 1))
    assert not responses[-1].is_provisional
    for r in responses:
        assert r.start <= r.end == pytest.approx(0.06 * min(r.frame_index + 1, first_frame + n))
        assert len(r.alternatives) >= 1


def turned_down(pcm: bytes, db: float) -> bytes:
    """The audio as a microphone `db` quieter (or farther away) would send it."""
    return float_to_pcm16(pcm16_to_float(pcm) * 10 ** (-db / 20))


def offline(stt: SpeechToText, pcm: bytes, **options: Any) -> str:
    return stt.text(stt.recognizer.transcribe(stt.features(pcm16_to_float(pcm)), **options))


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def worker_info(stub: transcriber_pb2_grpc.TranscriberStub) -> pb.WorkerInfo:
    return stub.GetWorkerInfo(pb.GetWorkerInfoRequest(), timeout=10)


# --- the text of responses (in-process) --------------------------------------------------------


def test_final_deltas_concatenate_into_the_offline_text(tiny_tokenizer_bytes: bytes) -> None:
    tokenizer = Tokenizer.from_bytes(tiny_tokenizer_bytes)
    ids = tokenizer.encode("the quick brown fox jumps over")
    transcript = Transcript(tokenizer)
    pieces = [transcript.finalise([Token(i, 0) for i in ids[k : k + 3]]) for k in range(0, len(ids), 3)]
    assert "".join(pieces) == tokens_to_text(tokenizer, [Token(i, 0) for i in ids]).strip()
    assert not pieces[0].startswith(" ")
    assert transcript.tail([]) == ""
    assert transcript.tail([Token(i, 0) for i in tokenizer.encode("a lazy")]) == " a lazy"


def test_a_replayed_stream_continues_the_clients_text_with_a_space(tiny_tokenizer_bytes: bytes) -> None:
    """After a move the new worker's first text follows text the client already has."""
    tokenizer = Tokenizer.from_bytes(tiny_tokenizer_bytes)
    transcript = Transcript(tokenizer, continues=True)
    assert transcript.tail([]) == ""
    assert transcript.finalise([]) == ""
    assert transcript.tail([Token(i, 0) for i in tokenizer.encode("the")]) == " the"
    assert transcript.finalise([Token(i, 0) for i in tokenizer.encode("the quick")]) == " the quick"
    assert transcript.finalise([Token(i, 0) for i in tokenizer.encode(" fox")]) == " fox"


def test_alternatives_rank_texts_by_the_share_of_hypotheses_saying_them(tiny_tokenizer_bytes: bytes) -> None:
    tokenizer = Tokenizer.from_bytes(tiny_tokenizer_bytes)

    def tokens(text: str) -> list[Token]:
        return [Token(i, 0) for i in tokenizer.encode(text)]

    transcript = Transcript(tokenizer)
    nbest = [(tokens("the big sphinx"), -1.0), (tokens("the big dog"), -2.0), (tokens("the lazy"), -9.0)]
    alternatives = transcript.alternatives(tokens("the"), nbest, limit=3)
    texts = [a.transcript for a in alternatives]
    confidences = [a.confidence for a in alternatives]
    assert texts == ["the", "the big sphinx", "the big dog"]
    assert confidences[0] == pytest.approx(1.0)
    assert confidences == sorted(confidences, reverse=True) and all(0 <= c <= 1 for c in confidences)
    single = transcript.alternatives(tokens("the big"), [(tokens("the big"), 0.0)], limit=3)
    assert [(a.transcript, a.confidence) for a in single] == [("the big", 1.0)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 30), max_size=6)), max_size=25))
def test_tails_are_the_same_whether_remembered_or_computed_afresh(
    tiny_tokenizer_bytes: bytes, calls: list[tuple[bool, list[int]]]
) -> None:
    """Each call finalises some tokens or asks for a tail; the transcript that remembers tails
    answers exactly as one that builds every tail from scratch (a new Transcript each time)."""
    tokenizer = Tokenizer.from_bytes(tiny_tokenizer_bytes)
    remembering, finalised = Transcript(tokenizer), []
    for finalise, ids in calls:
        tokens = [Token(i, 0) for i in ids]
        if finalise:
            remembering.finalise(tokens)
            finalised += tokens
            continue
        fresh = Transcript(tokenizer)
        fresh.finalise(finalised)
        assert remembering.tail(tokens) == fresh.tail(tokens)
        assert remembering.tail(tokens) == fresh.tail(tokens), "asked again: the remembered tail"


# --- CPU backend ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_worker() -> Iterator[ServiceProcess]:
    """Greedy, at most 3 streams, short state-reset segments."""
    with running(transcriber("--cpu-backend", "--max-streams", "3", *RESET_FLAGS)) as service:
        yield service


@pytest.fixture(scope="module")
def greedy(checkpoint: HardwareCheckpoint) -> SpeechToText:
    return SpeechToText(checkpoint, streaming=RESETS)


def test_cpu_stream_gets_one_response_per_frame_and_the_offline_transcript(
    cpu_worker: ServiceProcess, clips: list[bytes], greedy: SpeechToText
) -> None:
    pcm = clips[0]
    assert len(pcm) % FRAME_BYTES, "the last frame should be a short one"
    with cpu_worker.channel() as channel:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        responses = list(stub.Transcribe(requests(pb.StreamConfig(stream_id="one"), pcm), timeout=60))
        empty = list(stub.Transcribe(requests(pb.StreamConfig(stream_id="empty"), b""), timeout=60))
        info = worker_info(stub)
    check_contract(responses, pcm)
    assert finals(responses) == offline(greedy, pcm)
    assert any(r.is_provisional for r in responses)
    assert sum(not r.is_provisional for r in responses) >= 2, "state resets should finalise text mid-stream"
    assert [r.frame_index for r in empty] == [0] and finals(empty) == offline(greedy, b"")
    assert info.backend == "cpu" and info.models == ["en-small"] and info.max_streams == 3
    assert info.worker_id.startswith("cpu-") and info.streams_open == 0 and not info.draining
    for name in ["", SERVICE]:
        assert cpu_worker.health(name) == health_pb2.HealthCheckResponse.SERVING
    metrics = cpu_worker.metrics()
    assert (metric_value(metrics, "gharial_transcriber_frames_total") or 0) >= len(frames_of(pcm))
    assert (metric_value(metrics, "gharial_transcriber_streams_total", outcome="completed") or 0) >= 2
    assert metric_value(metrics, "gharial_transcriber_streams_open") == 0
    for stage in ["features", "model", "decode"]:
        assert (metric_value(metrics, "gharial_transcriber_frame_stage_seconds_count", stage=stage) or 0) > 0
    assert (metric_value(metrics, "gharial_transcriber_batch_size_count") or 0) > 0
    assert cpu_worker.events("stream_closed")[0]["stream_id"] == "one"


def test_a_quiet_microphone_is_lifted_to_the_models_level(
    cpu_worker: ServiceProcess, clips: list[bytes], checkpoint: HardwareCheckpoint, greedy: SpeechToText
) -> None:
    quiet = turned_down(clips[0], 30.0)
    with cpu_worker.channel() as channel:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        responses = list(stub.Transcribe(requests(pb.StreamConfig(stream_id="quiet"), quiet), timeout=60))
    check_contract(responses, quiet)
    as_is = SpeechToText(checkpoint, streaming=RESETS, auto_gain=None)
    assert offline(as_is, quiet) == ""  # without the gain the model hears nothing
    assert finals(responses) == offline(greedy, quiet) and len(finals(responses).split()) >= 3
    metrics = cpu_worker.metrics()
    assert (metric_value(metrics, "gharial_transcriber_speech_level_dbfs_count") or 0) >= 1
    assert (metric_value(metrics, "gharial_transcriber_input_gain_db_sum") or 0) > 20


def test_concurrent_streams_get_their_own_transcripts_and_a_full_worker_refuses(
    cpu_worker: ServiceProcess, clips: list[bytes], greedy: SpeechToText
) -> None:
    gate = threading.Event()
    with cpu_worker.channel() as channel, ThreadPoolExecutor(3) as pool:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        configs = [pb.StreamConfig(stream_id=f"c{i}", first_frame=100 * i) for i in range(3)]
        calls = [
            pool.submit(list, stub.Transcribe(requests(config, pcm, pause_at=3, gate=gate), timeout=60))
            for config, pcm in zip(configs, clips, strict=True)
        ]
        wait_until(lambda: worker_info(stub).streams_open == 3)
        with pytest.raises(grpc.RpcError) as full:
            list(stub.Transcribe(requests(pb.StreamConfig(stream_id="extra"), clips[0]), timeout=60))
        gate.set()
        results = [call.result(timeout=60) for call in calls]
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for config, pcm, responses in zip(configs, clips, results, strict=True):
        check_contract(responses, pcm, first_frame=config.first_frame)
        assert finals(responses) == offline(greedy, pcm)
    assert (metric_value(cpu_worker.metrics(), "gharial_transcriber_rejects_total", reason="full") or 0) >= 1


@pytest.mark.parametrize(
    ("config", "audio", "field"),
    [
        (pb.StreamConfig(model="en-huge"), [], "model"),
        (pb.StreamConfig(version="7"), [], "version"),
        (pb.StreamConfig(lang="fr-FR"), [], "lang"),
        (pb.StreamConfig(alternatives=11), [], "alternatives"),
        (pb.StreamConfig(keywords=["!!"]), [], "keywords[0]"),
        (None, [b"\x00" * FRAME_BYTES], "config"),
        (pb.StreamConfig(), [b"\x00" * 3], "audio"),
        (pb.StreamConfig(), [b"\x00" * 100, b"\x00" * FRAME_BYTES], "audio"),
    ],
)
def test_a_bad_stream_is_refused_naming_the_field(
    cpu_worker: ServiceProcess, config: pb.StreamConfig | None, audio: list[bytes], field: str
) -> None:
    parts = [] if config is None else [pb.TranscribeRequest(config=config)]
    parts += [pb.TranscribeRequest(audio=a) for a in audio] + [pb.TranscribeRequest(end_of_stream=True)]
    with cpu_worker.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        list(transcriber_pb2_grpc.TranscriberStub(channel).Transcribe(iter(parts), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}:")


@pytest.fixture(scope="module")
def beam_worker() -> Iterator[ServiceProcess]:
    with running(transcriber("--cpu-backend", "--beam-width", "4")) as service:
        yield service


def test_beam_search_gives_ranked_alternatives_and_the_offline_transcript(
    beam_worker: ServiceProcess, clips: list[bytes], checkpoint: HardwareCheckpoint
) -> None:
    beam = SpeechToText(checkpoint, beam_width=4)
    keywords = ["bigger", "thought"]
    with beam_worker.channel() as channel:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        plain = list(stub.Transcribe(requests(pb.StreamConfig(alternatives=3), clips[0]), timeout=60))
        boosted = list(stub.Transcribe(requests(pb.StreamConfig(keywords=keywords), clips[1]), timeout=60))
    check_contract(plain, clips[0])
    assert finals(plain) == offline(beam, clips[0])
    keyword_ids = [beam.tokenizer.encode(k) for k in keywords]
    assert finals(boosted) == offline(beam, clips[1], keywords=keyword_ids)
    assert max(len(r.alternatives) for r in plain) > 1, "beam search should offer alternatives"
    for r in plain:
        confidences = [a.confidence for a in r.alternatives]
        assert len(confidences) <= 3 and all(0 <= c <= 1 for c in confidences)
        assert confidences == sorted(confidences, reverse=True)


def test_registers_in_redis_and_drains_on_sigterm(
    tmp_path: Path, clips: list[bytes], checkpoint: HardwareCheckpoint
) -> None:
    """SIGTERM: health and registration say draining, new streams are refused, an open stream
    finishes, one that does not within --drain-seconds ends UNAVAILABLE; exit 0, registration gone."""
    with RedisServer(tmp_path) as redis_server:
        command = transcriber("--cpu-backend", "--redis-url", redis_server.url, "--worker-id", "cpu-test")
        balancer = LoadBalancer(redis_server.url)
        with running([*command, "--drain-seconds", "4"]) as worker, worker.channel() as channel:
            wait_until(lambda: bool(balancer.workers("en-small")))
            (registered,) = balancer.workers("en-small")
            assert (registered.worker_id, registered.address) == ("cpu-test", worker.address)
            assert registered.capacity == 256 and not registered.draining
            stub = transcriber_pb2_grpc.TranscriberStub(channel)
            finishing_gate, idle_gate = threading.Event(), threading.Event()
            with ThreadPoolExecutor(2) as pool:
                finishing = pool.submit(
                    list,
                    stub.Transcribe(requests(pb.StreamConfig(), clips[0], 5, finishing_gate), timeout=60),
                )
                idle = pool.submit(
                    list, stub.Transcribe(requests(pb.StreamConfig(), clips[1], 5, idle_gate), timeout=60)
                )
                wait_until(lambda: worker_info(stub).streams_open == 2)
                worker.process.send_signal(signal.SIGTERM)
                wait_until(lambda: worker.health() == health_pb2.HealthCheckResponse.NOT_SERVING)
                wait_until(lambda: balancer.workers()[0].draining)
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.Transcribe(requests(pb.StreamConfig(), clips[2]), timeout=60))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                finishing_gate.set()
                assert finals(finishing.result(timeout=60)) == offline(SpeechToText(checkpoint), clips[0])
                with pytest.raises(grpc.RpcError) as ended:
                    idle.result(timeout=60)
                idle_gate.set()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert worker.process.wait(30) == 0
            wait_until(lambda: len(worker.events("stream_closed")) == 2)
            assert sorted(e["outcome"] for e in worker.events("stream_closed")) == [
                "completed",
                "interrupted",
            ]
        assert balancer.workers() == []
        balancer.close()


# --- accelerator backend -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program_file(checkpoint: HardwareCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("program") / "en-small.prog"
    compile_checkpoint(checkpoint).save(path)
    return path


@pytest.fixture(scope="module")
def card() -> Iterator[ServiceProcess]:
    """An emulated card with no program: the transcriber loads it."""
    command = [str(BIN / "gharial-emulator"), "--port", "0", "--metrics-port", "0", "--card-id", "card-0"]
    with running(command) as service:
        yield service


@pytest.fixture
def vendor_key(tmp_path: Path) -> Path:
    private_key, _ = generate_keys(tmp_path / "vendor")
    return private_key


def licence_dir(directory: Path, vendor_key: Path, **fields: Any) -> Path:
    """A licence directory holding one licence (fields override a valid one for card-0)."""
    directory.mkdir()
    (directory / "vendor.pub").write_bytes((vendor_key.parent / "vendor.pub").read_bytes())
    body = {"card_id": "card-0", "max_release_date": date(2099, 1, 1), "expires": date(2099, 1, 1)}
    issue(directory, vendor_key, **{**body, **fields})
    return directory


def license_service(directory: Path) -> list[str]:
    return [
        str(BIN / "gharial-license"),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--license-dir",
        str(directory),
    ]


def card_transcript(
    program: Program, pcm: bytes, segment_frames: int, auto_gain: AutoGainConfig | None = DEFAULT_AUTO_GAIN
) -> str:
    """The program's arithmetic on one stream, reset every `segment_frames` frames: the card's text."""
    extractor = FeatureExtractor(program.meta.config.features, program.meta.mel_stats, auto_gain)
    features = extractor(pcm16_to_float(pcm))
    executor = ProgramExecutor(program)
    state = executor.new_state(1)
    executor.reset(state, [0])
    tokens: list[int] = []
    for t, frame in enumerate(features.reshape(-1, 2, features.shape[-1])):
        if t and t % segment_frames == 0:
            executor.reset(state, [0])
        tokens += executor.run_batch(
            state, [0], frame[None], [program.meta.layout.max_symbols_per_step]
        ).tokens[0]
    tokenizer = Tokenizer.from_bytes(program.tokenizer_model)
    return tokens_to_text(tokenizer, [Token(i, 0) for i in tokens]).strip()


def test_accelerator_streams_get_the_cards_transcript(
    tmp_path: Path, vendor_key: Path, card: ServiceProcess, program_file: Path, clips: list[bytes]
) -> None:
    streams = [*clips, turned_down(clips[0], 30.0)]  # the last one as a far microphone sends it
    directory = licence_dir(tmp_path / "lic", vendor_key)
    with running(license_service(directory)) as licenses:
        command = transcriber(
            "--emulator", card.address, "--program", str(program_file), "--license-service", licenses.address,
            "--card-id", "card-0", "--sr-segment", "1.2", "--sr-overlap", "0",
        )  # fmt: skip
        with running(command) as worker, worker.channel() as channel, ThreadPoolExecutor(4) as pool:
            stub = transcriber_pb2_grpc.TranscriberStub(channel)
            calls = [
                pool.submit(list, stub.Transcribe(requests(pb.StreamConfig(alternatives=2), pcm), timeout=60))
                for pcm in streams
            ]
            results = [call.result(timeout=60) for call in calls]
            info = worker_info(stub)
            metrics = worker.metrics()
            assert worker.terminate() == 0
    program = Program.load(program_file)
    for pcm, responses in zip(streams, results, strict=True):
        check_contract(responses, pcm)
        assert finals(responses) == card_transcript(program, pcm, segment_frames=20)
    assert len(finals(results[-1]).split()) >= 3  # the quiet stream was lifted on the host
    assert card_transcript(program, streams[-1], segment_frames=20, auto_gain=None) == ""
    assert (info.backend, info.worker_id, info.models) == ("accelerator", "card-0", ["en-small"])
    assert (
        metric_value(metrics, "gharial_transcriber_license_allowed", card_id="card-0", verdict="ALLOWED") == 1
    )
    assert (metric_value(metrics, "gharial_transcriber_batch_size_count") or 0) > 0
    assert worker.events("program_loaded") or worker.events("program_already_loaded")


def test_accelerator_refuses_to_start_without_a_valid_licence(
    tmp_path: Path, vendor_key: Path, card: ServiceProcess, program_file: Path
) -> None:
    accelerator = ["--emulator", card.address, "--program", str(program_file)]
    other_card = licence_dir(tmp_path / "other", vendor_key, card_id="card-7")
    expired = licence_dir(tmp_path / "expired", vendor_key, expires=date(2020, 1, 1))
    with running(license_service(other_card)) as licenses:
        refused = subprocess.run(
            transcriber(*accelerator, "--license-service", licenses.address),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert refused.returncode != 0
    assert "no licence names card card-0" in refused.stderr
    refused = subprocess.run(
        transcriber(*accelerator, "--license-dir", str(expired)), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "expired on 2020-01-01" in refused.stderr


def test_a_worker_whose_card_dies_stops_serving(tmp_path: Path, vendor_key: Path, program_file: Path) -> None:
    """Its own emulator, killed: health goes NOT_SERVING (and the Redis record, if any, draining) so
    balancers stop sending new streams to a worker that cannot run them."""
    directory = licence_dir(tmp_path / "lic", vendor_key)
    emulator = [str(BIN / "gharial-emulator"), "--port", "0", "--metrics-port", "0", "--card-id", "card-0"]
    with running(license_service(directory)) as licenses, running(emulator) as card:
        command = transcriber(
            "--emulator", card.address, "--program", str(program_file), "--license-service", licenses.address,
        )  # fmt: skip
        with running(command) as worker:
            assert worker.health() == health_pb2.HealthCheckResponse.SERVING
            card.process.kill()
            card.process.wait()
            deadline = time.monotonic() + 20
            while worker.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "the worker still says SERVING without its card"
                time.sleep(0.2)
            assert worker.events("card_lost")
            assert worker.terminate() == 0
