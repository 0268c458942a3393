"""One stream: its audio, 60 ms frame by frame, in; one response per frame and a final response out.

Per frame: host-side streaming features (identical to offline features, `gharial.asr.features`):
the session buffers the frame's samples and the backend computes its features (the CPU backend
all waiting streams' in one batch) and decodes the frame; then the decoding becomes a response
(`transcript.py`): final when the frame finalised tokens (an endpoint or a state reset), else
provisional. At end of stream the features are flushed (the tail padded, as offline does), the
backend finishes, and the final response carries everything not yet final.

Times: a response covers the audio from the end of the previous final response (where its text
starts) to the end of its frame, in seconds on the stream's timeline (which starts at
`first_frame` when a stream is replayed). Frame boundaries are used throughout, so a short last
frame counts as a whole one, as its padded features do.
"""

from __future__ import annotations

import time

import torch

from gharial.asr.config import FRAME_MS
from gharial.asr.decoding.base import Token
from gharial.audio import pcm16_to_float
from gharial.protos import transcriber_pb2 as pb
from gharial.transcription.backend import BackendStream, Decoded, ModelAssets
from gharial.transcription.metrics import FRAME_SECONDS, FRAMES, INPUT_GAIN, SPEECH_LEVEL, STAGE_SECONDS
from gharial.transcription.transcript import Transcript


class BadAudio(ValueError):
    """Audio that breaks the contract: frames of 1920 bytes, only the last one shorter."""


def seconds(frame: int) -> float:
    return frame * FRAME_MS / 1000


class Session:
    def __init__(
        self,
        stream: BackendStream,
        model: ModelAssets,
        alternatives: int,
        first_frame: int,
        continues_text: bool = False,
    ) -> None:
        self.stream = stream
        self.features = model.features.stream()
        self.transcript = Transcript(model.tokenizer, continues_text)
        self.alternatives = alternatives
        self.frame_bytes = 2 * model.features.samples_per_frame  # S16LE
        self.first_frame = first_frame
        self.next_frame = first_frame  # index of the next audio frame on the stream's timeline
        self.text_start = first_frame  # frame where the unfinalised text starts
        self.ended_short = False  # a short (so last) frame has come

    async def audio(self, data: bytes) -> pb.TranscribeResponse:
        """One frame of S16LE audio → its response."""
        received = time.perf_counter()
        if self.ended_short:
            raise BadAudio(
                f"audio after a frame shorter than {self.frame_bytes} bytes, which must be the last"
            )
        if not 0 < len(data) <= self.frame_bytes or len(data) % 2:
            raise BadAudio(f"an audio frame is 2 to {self.frame_bytes} bytes of S16LE, got {len(data)}")
        buffered = self.features.take_frames(pcm16_to_float(data))
        if buffered is None:  # a short frame, so the last one: padded now, as end of stream would
            self.ended_short = True
            buffered = self.features.flush_frames()
            assert buffered is not None, "flushing a part frame gives a frame"
        STAGE_SECONDS.labels(stage="features").observe(time.perf_counter() - received)
        decoded = await self._decode(buffered)
        started = time.perf_counter()
        index = self.next_frame
        self.next_frame += 1
        if decoded.final:
            response = self._final(decoded.final, index)
        else:
            alternatives = self.transcript.alternatives(decoded.provisional, decoded.nbest, self.alternatives)
            response = self._response(True, alternatives, index)
        finished = time.perf_counter()
        STAGE_SECONDS.labels(stage="decode").observe(finished - started)
        FRAME_SECONDS.observe(finished - received)
        FRAMES.inc()
        return response

    async def end(self) -> pb.TranscribeResponse:
        """End of stream → the final response, whose frame index is the one after the last frame.
        A stream that sent no audio still has one frame of padding decoded, as offline recognition
        of empty audio does."""
        padding = self.features.flush_frames()
        final = (await self._decode(padding)).final if padding is not None else []
        self._observe_level()
        return self._final(final + self.stream.finish(), self.next_frame)

    def _observe_level(self) -> None:
        """The stream's speech level and last gain, for the dashboards (auto gain only)."""
        level = self.features.level
        if level is not None and level.level_dbfs is not None:
            SPEECH_LEVEL.observe(level.level_dbfs)
            INPUT_GAIN.observe(level.gain)

    async def close(self) -> None:
        await self.stream.close()

    @property
    def frames_answered(self) -> int:
        return self.next_frame - self.first_frame

    async def _decode(self, buffered: torch.Tensor) -> Decoded:
        started = time.perf_counter()
        decoded = await self.stream.step(buffered)
        STAGE_SECONDS.labels(stage="model").observe(time.perf_counter() - started)
        return decoded

    def _final(self, tokens: list[Token], frame_index: int) -> pb.TranscribeResponse:
        text = self.transcript.finalise(tokens)
        response = self._response(False, [pb.Alternative(transcript=text, confidence=1.0)], frame_index)
        self.text_start = self.next_frame
        return response

    def _response(
        self, is_provisional: bool, alternatives: list[pb.Alternative], frame_index: int
    ) -> pb.TranscribeResponse:
        """Covers the unfinalised text's span: from where it starts to the end of the frames answered."""
        return pb.TranscribeResponse(
            start=seconds(self.text_start),
            end=seconds(self.next_frame),
            is_provisional=is_provisional,
            alternatives=alternatives,
            frame_index=frame_index,
        )
