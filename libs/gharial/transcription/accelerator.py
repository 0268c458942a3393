"""The accelerator backend: streams decoded greedily on an accelerator card (the emulator, DESIGN §4).

The card runs the encoder, prediction network, joint and argmax for each frame and returns the
frame's tokens; the host computes features (with the program's mel stats), turns tokens into text
(with the program's tokenizer) and decides what is final:

- endpoints: the rule of `Recognizer` (an EOS token, or `endpoint_silence_ms` without a new token);
- state resets: at every `sr_segment` boundary the stream's text so far is finalised and its frame
  goes to the card with `reset_state`, so the card starts that segment from a fresh state. There is
  no overlap (the card holds one state per stream, so no warm-up context can run beside it): this
  is what the CPU backend does with `sr_overlap` 0.

Beam search is not offered here: the card decodes greedily (its encoder-only mode, for host-side
beam search, is left for a later version), and keywords are ignored like greedy decoding ignores them.

Frames of every stream travel on one long-lived RunFrames call; each stream has at most one frame
in flight (it waits for the result before sending the next), as the card requires. The call's
reader thread hands each result to the event loop, where the stream's coroutine waits for it;
opening and closing a card stream (unary calls) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future

import grpc
from torch import Tensor

from gharial.accelerator.program import Program
from gharial.accelerator.wire import iter_chunks
from gharial.asr.config import FRAME_MS
from gharial.asr.decoding.base import Token
from gharial.asr.features import FeatureExtractor
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.pipeline import EOS_PIECE
from gharial.asr.streaming import StreamingConfig
from gharial.asr.tokenizer import Tokenizer
from gharial.plumbing.grpc_server import MESSAGE_SIZE_OPTIONS
from gharial.plumbing.logs import log_event
from gharial.protos import accelerator_pb2 as pb
from gharial.protos import accelerator_pb2_grpc, program_pb2
from gharial.transcription.backend import BackendError, BackendFull, Decoded, ModelAssets
from gharial.transcription.metrics import BATCH_SIZE

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # how long start-up waits for the card's service to answer
CALL_TIMEOUT_S = 10.0  # stream open/close
FRAME_TIMEOUT_S = 30.0  # a frame's result; the card answers in milliseconds unless something is wrong
PROBE_TIMEOUT_S = 1.0  # the card watchdog's GetCardInfo


class _RunFrames:
    """One RunFrames call: every stream's frames go out on it and each result goes to the frame
    waiting for it (a stream has one frame in flight, so the stream id identifies it)."""

    def __init__(self, stub: accelerator_pb2_grpc.AcceleratorStub, card_id: str) -> None:
        self.card_id = card_id
        self.alive = True
        self._requests: queue.Queue[pb.FrameRequest | None] = queue.Queue()
        self._waiting: dict[int, Future[pb.FrameResult]] = {}
        self._lock = threading.Lock()
        self._call = stub.RunFrames(iter(self._requests.get, None))
        threading.Thread(target=self._read, name=f"{card_id}-frames", daemon=True).start()

    def send(self, request: pb.FrameRequest) -> Future[pb.FrameResult]:
        future: Future[pb.FrameResult] = Future()
        with self._lock:
            if not self.alive:
                raise BackendError(f"card {self.card_id}: the RunFrames call has ended")
            self._waiting[request.stream_id] = future
        self._requests.put(request)
        return future

    def close(self) -> None:
        """Half-close: the call ends once the card has answered every frame sent."""
        self._requests.put(None)

    def _read(self) -> None:
        why = "the card ended the RunFrames call"
        last_batch = 0
        try:
            for result in self._call:
                if result.batch_id != last_batch:  # a batch's results arrive together: count it once
                    last_batch = result.batch_id
                    BATCH_SIZE.observe(result.batch_size)
                with self._lock:
                    future = self._waiting.pop(result.stream_id, None)
                if future is not None:
                    future.set_result(result)
        except grpc.RpcError as error:
            why = f"RunFrames failed: {error.code().name}: {error.details()}"
        with self._lock:
            self.alive = False
            waiting, self._waiting = self._waiting, {}
        if waiting:
            log_event(log, "card_call_ended", logging.WARNING, card_id=self.card_id, frames_lost=len(waiting))
        for future in waiting.values():
            future.set_exception(BackendError(f"card {self.card_id}: {why}"))


class CardConnection:
    """The transcriber's side of `gharial.v1.Accelerator` for its one card."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS)
        self._stub = accelerator_pb2_grpc.AcceleratorStub(self._channel)
        self.card_id = ""
        self._frames: _RunFrames | None = None
        self._lock = threading.Lock()

    def info(self) -> pb.CardInfo:
        """The card's identity and state, waiting up to CONNECT_TIMEOUT_S for its service."""
        try:
            info = self._stub.GetCardInfo(
                pb.GetCardInfoRequest(), timeout=CONNECT_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.RpcError as error:
            raise BackendError(f"cannot reach the card at {self.address}: {error.details()}") from error
        self.card_id = info.card_id
        return info

    def load(self, program_bytes: bytes, program: Program) -> int:
        """Put the program on the card unless it is already there; returns the card's max streams."""
        info = self.info()
        if info.HasField("program") and info.program.program_sha256 == program.sha256:
            log_event(log, "program_already_loaded", card_id=self.card_id, sha256=program.sha256)
            return info.max_streams
        chunks = (program_pb2.ProgramChunk(data=chunk) for chunk in iter_chunks(program_bytes))
        try:
            reply = self._stub.LoadProgram(chunks, timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as error:
            raise BackendError(f"card {self.card_id} refused the program: {error.details()}") from error
        log_event(log, "program_loaded", card_id=self.card_id, sha256=reply.program.program_sha256)
        return reply.max_streams

    def runs(self, program_sha256: str) -> bool | None:
        """Whether the card answers within a second and holds that program; None when it does not answer."""
        try:
            info = self._stub.GetCardInfo(pb.GetCardInfoRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return info.HasField("program") and info.program.program_sha256 == program_sha256

    def open_stream(self) -> int:
        request = pb.OpenStreamRequest(decode_mode=pb.DECODE_MODE_GREEDY)
        try:
            return int(self._stub.OpenStream(request, timeout=CALL_TIMEOUT_S).stream_id)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BackendFull(error.details()) from error
            raise BackendError(f"card {self.card_id}: cannot open a stream: {error.details()}") from error

    def close_stream(self, stream_id: int) -> None:
        try:
            self._stub.CloseStream(pb.CloseStreamRequest(stream_id=stream_id), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:  # gone already (card restarted or shutting down): nothing to free
            log_event(log, "card_close_failed", logging.DEBUG, card_stream=stream_id, error=error.details())

    async def run_frame(self, request: pb.FrameRequest) -> pb.FrameResult:
        """Send one frame and wait for its result; a dead RunFrames call is replaced by a new one."""
        with self._lock:
            if self._frames is None or not self._frames.alive:
                self._frames = _RunFrames(self._stub, self.card_id)
            frames = self._frames
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(frames.send(request)), FRAME_TIMEOUT_S)
        except TimeoutError as error:
            raise BackendError(f"card {self.card_id}: no result within {FRAME_TIMEOUT_S:.0f} s") from error
        if result.error.code:
            code = pb.FrameErrorCode.Name(result.error.code)
            raise BackendError(f"card {self.card_id} did not run the frame: {code}: {result.error.message}")
        return result

    def close(self) -> None:
        with self._lock:
            if self._frames is not None:
                self._frames.close()
        self._channel.close()


class AcceleratorBackend:
    kind = "accelerator"

    def __init__(
        self,
        card: CardConnection,
        program: Program,
        program_bytes: bytes,
        streaming: StreamingConfig,
        max_streams: int,
        auto_gain: AutoGainConfig | None = DEFAULT_AUTO_GAIN,
    ) -> None:
        tokenizer = Tokenizer.from_bytes(program.tokenizer_model)
        features = FeatureExtractor(program.meta.config.features, program.meta.mel_stats, auto_gain)
        self.model = ModelAssets(program.meta.config.name, features, tokenizer)
        self.card = card
        self._program, self._program_bytes = program, program_bytes
        self.streaming = streaming
        self.max_streams = max_streams
        pieces = tokenizer.id_to_piece
        self.eos_token_id = pieces.index(EOS_PIECE) if EOS_PIECE in pieces else None

    async def open_stream(self, keywords: list[list[int]]) -> CardStream:
        return CardStream(self, await asyncio.to_thread(self.card.open_stream))

    def card_ready(self) -> bool:
        """Whether the card answers and runs the program; a card that came back empty (restarted)
        gets the program again. Streams it held before are lost either way (the gateway replays)."""
        runs = self.card.runs(self._program.sha256)
        if runs is None:
            return False
        if not runs:
            try:
                self.card.load(self._program_bytes, self._program)
            except BackendError as error:
                log_event(
                    log, "program_reload_failed", logging.WARNING, card_id=self.card.card_id, error=str(error)
                )
                return False
        return True

    def close(self) -> None:
        self.card.close()


class CardStream:
    """One stream on the card; the host keeps the tokens since the last final and the frame count."""

    def __init__(self, backend: AcceleratorBackend, card_stream: int) -> None:
        self.backend = backend
        self.card_stream = card_stream
        self.frame = 0
        self.tokens: list[Token] = []  # since the last commit, EOS tokens included
        self._closed = False

    async def step(self, buffered: Tensor) -> Decoded:
        features = self.backend.model.features.of_buffered(buffered)
        segment = self.backend.streaming.segment_frames
        reset = bool(segment) and self.frame > 0 and self.frame % segment == 0
        final = self._commit() if reset else []
        request = pb.FrameRequest(
            stream_id=self.card_stream,
            frame_index=self.frame,
            features=features.numpy().astype("<f4").tobytes(),
            reset_state=reset,
        )
        result = await self.backend.card.run_frame(request)
        self.tokens += [Token(int(token), self.frame) for token in result.tokens]
        if self._at_endpoint():
            final += self._commit()
        self.frame += 1
        tail = self._shown(self.tokens)
        return Decoded(final, tail, [(tail, 0.0)])

    def finish(self) -> list[Token]:
        return self._commit()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self.backend.card.close_stream, self.card_stream)

    def _at_endpoint(self) -> bool:
        """`Recognizer`'s rule: an EOS token, or `endpoint_silence_ms` since the last token."""
        if not self.tokens:
            return False
        if any(token.id == self.backend.eos_token_id for token in self.tokens):
            return True
        silence_ms = self.backend.streaming.endpoint_silence_ms
        return silence_ms is not None and (self.frame - self.tokens[-1].frame) * FRAME_MS >= silence_ms

    def _commit(self) -> list[Token]:
        tokens, self.tokens = self.tokens, []
        return self._shown(tokens)

    def _shown(self, tokens: list[Token]) -> list[Token]:
        return [token for token in tokens if token.id != self.backend.eos_token_id]
