"""Re-cutting the client's binary frames into the transcribers' 60 ms frames.

Clients may send frames of any length > 0 (spec: "Request Frames"); the transcriber takes 60 ms
frames of 16 kHz S16LE audio, 960 samples or 1920 bytes (protos/transcriber.proto). Bytes that do not
fill a frame, an odd byte included, wait for the next client frame: nothing is dropped or reordered.
"""

from __future__ import annotations

FRAME_SAMPLES = 960
FRAME_BYTES = 2 * FRAME_SAMPLES
FRAME_SECONDS = 0.06


class Reframer:
    """Accumulates client bytes and hands out whole frames."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        self.frame_bytes = frame_bytes
        self._pending = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def push(self, data: bytes) -> list[bytes]:
        """The whole frames now available, in order; the rest waits for more data."""
        self._pending += data
        count = len(self._pending) // self.frame_bytes
        frames = [
            bytes(self._pending[i * self.frame_bytes : (i + 1) * self.frame_bytes]) for i in range(count)
        ]
        del self._pending[: count * self.frame_bytes]
        return frames

    def flush(self) -> bytes | None:
        """At end of stream: the tail padded with zeros (silence) to a whole frame, so it gets a
        response like every other 60 ms; None when nothing is left."""
        if not self._pending:
            return None
        tail = bytes(self._pending).ljust(self.frame_bytes, b"\0")
        self._pending.clear()
        return tail
