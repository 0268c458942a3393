"""Streaming recognition: explicit per-stream state, batched 60 ms steps, state resets, endpoints.

`Recognizer.step(features, streams)` advances many streams by one 60 ms frame in one call: one
encoder call over every stream's two 30 ms feature vectors, then one decoder call. Each stream is
a `Stream` object the caller keeps (a server holds thousands); nothing about a stream lives in
the recognizer.

`Recognizer.transcribe(features)` is the offline path: the encoder runs over the whole utterance
at once, then the same decoder, state-reset and endpoint logic as `step` runs frame by frame, so
streaming and offline give the same tokens.

State resets (DESIGN §2, for long streams): every `sr_segment` seconds the model restarts from a
fresh state. `sr_overlap` seconds before each reset a second "shadow" context starts from fresh
state on the same audio to warm up; at the reset the main context's result is finalised and the
shadow takes over, its tokens from the overlap discarded (they belong to the previous segment).

Endpoints: the result so far becomes final when the best hypothesis emits the EOS token (if the
vocabulary has one; it is never shown) or after `endpoint_silence_ms` without a new token, and at
end of stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from gharial.asr.batch_cache import BatchCache
from gharial.asr.config import FRAME_MS
from gharial.asr.decoding.base import Decoder, Token
from gharial.asr.model import RNNT, EncoderState

S = TypeVar("S")


@contextmanager
def fast_cpu_lstm() -> Iterator[None]:
    """oneDNN (mkldnn), torch's default CPU path for nn.LSTM, costs milliseconds per call at the
    small batches and 1-2 timesteps of a streaming step (base at batch 1: 35 ms a step with it,
    17 ms without; same numbers to 1e-7; bench/core_throughput.py measures both). LSTM layers
    prepacked for CPU inference (`gharial.asr.prepacked`, which SpeechToText applies to large
    layers, and to small ones where that is faster on the machine) are no longer nn.LSTM and call
    oneDNN's products directly, whatever the flag. Only the enabled flag is touched: torch's own
    flags() also resets TF32 and warns on every call."""
    previous = bool(torch.backends.mkldnn.enabled)
    torch.backends.mkldnn.set_flags(_enabled=False, _fp32_precision=None)
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(_enabled=previous, _fp32_precision=None)


class StreamingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sr_segment_s: float = Field(0.0, ge=0, description="state reset period in seconds; 0 turns resets off")
    sr_overlap_s: float = Field(3.0, ge=0, description="warm-up audio before each state reset, seconds")
    endpoint_silence_ms: int | None = Field(
        720, gt=0, description="finalise after this long without a new token; None: only at EOS token/end"
    )

    @model_validator(mode="after")
    def _overlap_fits(self) -> StreamingConfig:
        if self.sr_segment_s and self.sr_overlap_s >= self.sr_segment_s:
            raise ValueError("sr_overlap_s must be shorter than sr_segment_s")
        return self

    @property
    def segment_frames(self) -> int:
        return round(self.sr_segment_s * 1000 / FRAME_MS)

    @property
    def overlap_frames(self) -> int:
        return round(self.sr_overlap_s * 1000 / FRAME_MS) if self.segment_frames else 0


# The transcriber's default (and what benchmarks of the served model use): state resets every 15 s.
SERVER_STREAMING = StreamingConfig(sr_segment_s=15.0, sr_overlap_s=3.0)


@dataclass
class Context(Generic[S]):
    """The model state one decoding runs on: encoder LSTM state plus decoder state."""

    encoder: EncoderState  # each tensor [layers, 1, hidden]
    decoder: S


@dataclass
class Stream(Generic[S]):
    main: Context[S]
    shadow: Context[S] | None = None
    frame: int = 0  # index of the next 60 ms frame
    decoder_options: dict[str, Any] = field(default_factory=dict)
    finalised: list[Token] = field(default_factory=list)  # committed during the current step

    def contexts(self) -> list[Context[S]]:
        return [self.main] if self.shadow is None else [self.main, self.shadow]


@dataclass
class StepResult:
    frame: int
    final: list[Token] | None  # tokens finalised at this frame (maybe none); None: nothing was finalised
    provisional: list[Token]  # the unfinalised tail after this frame


class Recognizer(Generic[S]):
    def __init__(
        self,
        model: RNNT,
        decoder: Decoder[S],
        config: StreamingConfig | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.decoder = decoder
        self.config = config or StreamingConfig()
        self.eos_token_id = eos_token_id
        self.frames_per_step = model.cfg.features_per_frame
        self._encoder_states: BatchCache[EncoderState, EncoderState] = BatchCache(
            EncoderState.cat, EncoderState.split, EncoderState.select
        )

    def new_stream(self, **decoder_options: Any) -> Stream[S]:
        """A fresh stream; `decoder_options` go to the decoder's initial_state (e.g. keywords)."""
        return Stream(main=self._new_context(decoder_options), decoder_options=decoder_options)

    def _new_context(self, decoder_options: dict[str, Any]) -> Context[S]:
        return Context(self.model.encoder.initial_state(1), self.decoder.initial_state(**decoder_options))

    @torch.inference_mode()
    def step(self, features: Tensor, streams: list[Stream[S]]) -> list[StepResult]:
        """Advance each stream by one 60 ms frame: features [B, 2, F] (row b for streams[b])."""
        if features.shape[:2] != (len(streams), self.frames_per_step):
            raise ValueError(
                f"expected features [{len(streams)}, {self.frames_per_step}, F], got {list(features.shape)}"
            )
        for stream in streams:
            self._apply_state_resets(stream)
        contexts = [c for s in streams for c in s.contexts()]
        if len(contexts) > len(streams):  # shadow contexts run on their stream's features too
            features = features[torch.tensor([b for b, s in enumerate(streams) for _ in s.contexts()])]
        with fast_cpu_lstm():
            out, state = self.model.encoder(
                features, self._encoder_states.gather([c.encoder for c in contexts])
            )
        for context, own in zip(contexts, self._encoder_states.split(state), strict=True):
            context.encoder = own
        return self._decode(streams, contexts, self.model.joint.enc_proj(out[:, 0]))

    @torch.inference_mode()
    def transcribe(self, features: Tensor, **decoder_options: Any) -> list[Token]:
        """Offline: features [T, F] of a whole utterance (T a multiple of 2) → all its tokens."""
        stream = self.new_stream(**decoder_options)
        segments = self._encode_segments(features)
        tokens: list[Token] = []
        for t in range(features.shape[0] // self.frames_per_step):
            self._apply_state_resets(stream)
            # the main context runs segment t // segment_frames; a shadow, if any, the next one
            active = segments[self._segment_of(t) :][: len(stream.contexts())]
            encoded = torch.stack([output[t - start] for start, output in active])
            (result,) = self._decode([stream], stream.contexts(), encoded)
            tokens += result.final or []
        return tokens + self.finish(stream)

    def finish(self, stream: Stream[S]) -> list[Token]:
        """End of stream: finalise and return the remaining tokens."""
        stream.shadow = None
        return self._strip_eos(self.decoder.commit(stream.main.decoder, end_of_stream=True))

    def _segment_of(self, frame: int) -> int:
        segment = self.config.segment_frames
        return frame // segment if segment else 0

    def _encode_segments(self, features: Tensor) -> list[tuple[int, Tensor]]:
        """(first frame, joint-projected encoder output [frames, H]) of each state-reset segment,
        encoded from a fresh state as one batch. Without resets: one segment, the whole utterance."""
        n_frames = features.shape[0] // self.frames_per_step
        segment, overlap = self.config.segment_frames, self.config.overlap_frames
        bounds = [(0, n_frames)]
        if segment:
            count = -(-(n_frames + overlap) // segment)  # every segment that starts before the end
            bounds = [(max(0, k * segment - overlap), min(n_frames, (k + 1) * segment)) for k in range(count)]
        per_frame = features.reshape(n_frames, self.frames_per_step, -1)
        batch = torch.nn.utils.rnn.pad_sequence(
            [per_frame[a:b].flatten(0, 1) for a, b in bounds], batch_first=True
        )
        out, _ = self.model.encoder(batch)
        projected = self.model.joint.enc_proj(out)
        return [(a, projected[k, : b - a]) for k, (a, b) in enumerate(bounds)]

    def _apply_state_resets(self, stream: Stream[S]) -> None:
        """Before frame t: start the shadow context `overlap` frames before each reset; at the
        reset, finalise the main context and let the shadow take over."""
        segment, overlap, t = self.config.segment_frames, self.config.overlap_frames, stream.frame
        if not segment or t == 0:
            return
        if (t + overlap) % segment == 0:
            stream.shadow = self._new_context(stream.decoder_options)
        if t % segment == 0 and stream.shadow is not None:
            stream.finalised += self._strip_eos(self.decoder.commit(stream.main.decoder))
            self.decoder.commit(stream.shadow.decoder)  # its overlap tokens belong to the old segment
            stream.main, stream.shadow = stream.shadow, None

    def _decode(
        self, streams: list[Stream[S]], contexts: list[Context[S]], encoded: Tensor
    ) -> list[StepResult]:
        frames = [s.frame for s in streams for _ in s.contexts()]
        with fast_cpu_lstm():  # the prediction network steps one token at a time
            self.decoder.advance(encoded, [c.decoder for c in contexts], frames)
        results = []
        for stream in streams:
            committed = bool(stream.finalised)
            if self._at_endpoint(stream):
                stream.finalised += self._strip_eos(self.decoder.commit(stream.main.decoder))
                committed = True
            final, stream.finalised = stream.finalised, []
            provisional = self._strip_eos(self.decoder.provisional(stream.main.decoder))
            results.append(StepResult(stream.frame, final if committed else None, provisional))
            stream.frame += 1
        return results

    def _at_endpoint(self, stream: Stream[S]) -> bool:
        best = self.decoder.best(stream.main.decoder)
        if not best:
            return False
        if self.eos_token_id is not None and any(t.id == self.eos_token_id for t in best):
            return True
        silence_ms = self.config.endpoint_silence_ms
        return silence_ms is not None and (stream.frame - best[-1].frame) * FRAME_MS >= silence_ms

    def _strip_eos(self, tokens: list[Token]) -> list[Token]:
        return [t for t in tokens if t.id != self.eos_token_id]
