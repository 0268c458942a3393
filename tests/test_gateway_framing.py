"""Re-cutting client frames into 60 ms transcriber frames: nothing dropped, reordered or invented."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gharial.gateway.framing import FRAME_BYTES, Reframer


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` split at the given chunk sizes (cycled), every chunk non-empty."""
    chunks, start, i = [], 0, 0
    while start < len(data):
        chunks.append(data[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return chunks


@given(st.binary(max_size=5 * FRAME_BYTES + 7), st.lists(st.integers(1, 3 * FRAME_BYTES), min_size=1))
def test_any_chunking_gives_the_original_bytes_in_whole_frames(data: bytes, sizes: list[int]) -> None:
    reframer = Reframer()
    frames = [frame for chunk in cut(data, sizes) for frame in reframer.push(chunk)]
    assert all(len(frame) == FRAME_BYTES for frame in frames)
    assert reframer.pending_bytes == len(data) % FRAME_BYTES
    tail = reframer.flush()
    if len(data) % FRAME_BYTES:
        assert tail is not None
        frames.append(tail)
    else:
        assert tail is None
    padding = -len(data) % FRAME_BYTES
    assert b"".join(frames) == data + b"\0" * padding
    assert reframer.pending_bytes == 0 and reframer.flush() is None


def test_odd_byte_counts_are_carried_over() -> None:
    reframer = Reframer()
    assert reframer.push(b"\x01" * 1919) == []
    assert reframer.push(b"\x02\x03") == [b"\x01" * 1919 + b"\x02"]
    assert reframer.pending_bytes == 1
    assert reframer.flush() == b"\x03" + b"\0" * (FRAME_BYTES - 1)


def test_one_chunk_of_many_frames() -> None:
    data = bytes(range(256)) * 30  # 7680 bytes = 4 frames
    frames = Reframer().push(data)
    assert frames == [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]
