"""Programs over gRPC: chunking (programs exceed gRPC's message limit) and ProgramInfo messages.

Shared by the compiler and the emulator services, so both speak protos/program.proto alike.
"""

from __future__ import annotations

from collections.abc import Iterator

from gharial.accelerator.program import ProgramInfo
from gharial.protos import program_pb2

CHUNK_BYTES = 1 << 20  # what Gharial sends (protos/program.proto); receivers accept any size


def iter_chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`data` in pieces of `size` bytes (the last one shorter), in order; nothing for empty data."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def program_info_to_proto(info: ProgramInfo) -> program_pb2.ProgramInfo:
    return program_pb2.ProgramInfo(**info.model_dump())
