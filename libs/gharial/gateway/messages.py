"""What travels on the websocket: its path and subprotocol, and the JSON text frames the gateway
sends, one per 60 ms of audio (spec: "Response Frames"). Clients import this module alone."""

from __future__ import annotations

from pydantic import BaseModel

STREAM_PATH = "/asr/v0.1/stream"
SUBPROTOCOL = "stream.asr.api.myrtle.ai"


class Alternative(BaseModel):
    transcript: str
    confidence: float


class StreamResponse(BaseModel):
    """Seconds since the stream's start for the span covered; a final response (`is_provisional`
    false) carries only the text finalised since the previous final one, so the finals of a stream,
    concatenated, are its transcript."""

    start: float
    end: float
    is_provisional: bool
    alternatives: list[Alternative]
