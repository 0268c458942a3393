"""Program files: what the compiler makes from a hardware checkpoint and an accelerator card runs.

A program holds the quantized tensors, the layout (kernels, registers, state slots: see `layout.py`)
and everything the host needs around the card (mel stats, tokenizer, optional n-gram LM), so one
file is a complete deployable model (DESIGN §3). On disk, integers little-endian::

    magic           8 bytes   b"GHARPROG"
    total_length    u64       bytes in the whole file, trailer included
    header_length   u64
    header          UTF-8 JSON of ProgramHeader: ProgramMeta, the tensor table (name, dtype, shape,
                    offset, length) and the asset table (tokenizer model, n-gram LM: name, offset, length)
    data            the tensors' raw little-endian bytes, then the assets' bytes, each at its table
                    offset (64-byte aligned)
    trailer         32 bytes: sha256 of everything before it

Why this shape:
- The preamble and the trailer are the same in every format version, so a file of any version is
  checked for truncation and corruption before its header is interpreted; only then does the
  header's `format_version` decide whether this gharial can read the rest.
- The header is JSON checked by pydantic (extra="forbid"): self-describing (`head -c 4000` shows
  it), and nothing in the file can execute code on the machine loading it. Byte blobs (an n-gram LM
  is megabytes) stay raw in the data section rather than base64 in the header.
- Deterministic: no clock, no hash-ordered containers, the release date a constant of the toolchain
  (`gharial.RELEASE_DATE`), so the same checkpoint always compiles to the same bytes and the file's
  sha256 (`Program.sha256`, ProgramInfo.program_sha256) identifies the program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

import gharial
from gharial.accelerator.layout import ProgramLayout, macs_per_frame
from gharial.asr.config import ModelConfig
from gharial.asr.features import MelStats
from gharial.files import atomic_write

FORMAT_NAME: Final = "gharial-program"
FORMAT_VERSION = 2  # 2: int16 weights (1: int8, December 2026)
SUPPORTED_VERSIONS = (FORMAT_VERSION,)  # versions `from_bytes` reads
MAGIC = b"GHARPROG"
_PREAMBLE = struct.Struct("<8sQQ")  # magic, total_length, header_length
_TRAILER_BYTES = 32
_ALIGN = 64
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
_TORCH_DTYPES = {"int16": torch.int16, "float32": torch.float32}


class ProgramError(ValueError):
    """A program that cannot be written or read; the message names the file and the problem."""


class ProgramMeta(BaseModel):
    """Everything in a program except its tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["gharial-program"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    program_version: str = gharial.__version__  # the compiling toolchain (licences cap it)
    release_date: str = gharial.RELEASE_DATE  # that toolchain's release date, ISO 8601
    config: ModelConfig
    layout: ProgramLayout
    source_checksum: str  # the hardware checkpoint's checksum
    notes: str = ""
    mel_stats: MelStats  # host-side assets: the mel stats here, the byte blobs in the data section


class AssetEntry(BaseModel):
    """Where one byte blob is in the file's data section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["tokenizer_model", "ngram_lm"]
    offset: int = Field(ge=0)  # from the start of the data section
    length: int = Field(ge=0)


class TensorEntry(BaseModel):
    """Where one tensor's bytes are in the file's data section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: Literal["int16", "float32"]
    shape: tuple[int, ...]
    offset: int = Field(ge=0)  # from the start of the data section
    length: int = Field(ge=0)


class ProgramHeader(ProgramMeta):
    """The file's JSON header: the meta plus the tables of the data section."""

    tensors: tuple[TensorEntry, ...]
    assets: tuple[AssetEntry, ...]


class ProgramInfo(BaseModel):
    """What a program says about itself: the fields of protos/program.proto's ProgramInfo."""

    program_sha256: str
    format_version: int
    program_version: str
    release_date: str
    architecture: str
    source_checksum: str
    weight_bytes: int
    state_bytes_per_stream: int
    macs_per_frame: int
    frame_feature_count: int
    blank_id: int


@dataclasses.dataclass(eq=False)
class Program:
    """A compiled model: meta (layout, mel stats, provenance), tensors named as in the layout, and
    the host's byte assets. Treat it as immutable: `sha256` is computed once."""

    meta: ProgramMeta
    tensors: dict[str, Tensor]
    tokenizer_model: bytes
    ngram_lm: bytes | None = None

    @property
    def layout(self) -> ProgramLayout:
        return self.meta.layout

    @cached_property
    def sha256(self) -> str:
        """sha256 hex of the program file: the program's identity."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def validate(self, where: str | os.PathLike[str] = "program") -> None:
        """The tensors are exactly the layout's, with its dtypes and shapes."""
        found = {name: (_dtype_name(t, name, where), tuple(t.shape)) for name, t in self.tensors.items()}
        _check_tensors_match_layout(found, self.layout, where)

    def to_bytes(self) -> bytes:
        self.validate()
        data = bytearray()

        def put(blob: bytes) -> tuple[int, int]:
            data.extend(b"\x00" * (-len(data) % _ALIGN))
            offset = len(data)
            data.extend(blob)
            return offset, len(blob)

        tensors = []
        for spec in self.layout.tensors:
            array = self.tensors[spec.name].contiguous().numpy().astype(_NUMPY_DTYPES[spec.dtype])
            offset, length = put(array.tobytes())
            tensors.append(
                TensorEntry(name=spec.name, dtype=spec.dtype, shape=spec.shape, offset=offset, length=length)
            )
        blobs: dict[Literal["tokenizer_model", "ngram_lm"], bytes | None] = {
            "tokenizer_model": self.tokenizer_model,
            "ngram_lm": self.ngram_lm,
        }
        assets = []
        for name, blob in blobs.items():
            if blob is not None:
                offset, length = put(blob)
                assets.append(AssetEntry(name=name, offset=offset, length=length))
        header = ProgramHeader(**dict(self.meta), tensors=tuple(tensors), assets=tuple(assets))
        return pack(header.model_dump_json().encode(), bytes(data))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename): a crash never leaves a truncated program."""
        data = self.to_bytes()
        with atomic_write(path) as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Program:
        path = Path(path)
        if not path.is_file():
            raise ProgramError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
        return cls.from_bytes(path.read_bytes(), where=path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str | os.PathLike[str] = "program") -> Program:
        """Parse and fully check a program file; every problem is a ProgramError naming `where`."""
        header_bytes, body = unpack(data, where)
        header_dict = _parse_header_json(header_bytes, where)
        _check_format_version(header_dict, where)
        try:
            header = ProgramHeader.model_validate_json(header_bytes)
        except ValidationError as e:
            raise ProgramError(f"{where}: invalid header: {_summarise(e)}") from e
        entries = {e.name: e for e in header.tensors}
        if len(entries) != len(header.tensors):
            raise ProgramError(f"{where}: the tensor table names a tensor more than once")
        _check_tensors_match_layout(
            {e.name: (e.dtype, e.shape) for e in header.tensors}, header.layout, where
        )
        tensors = {name: _read_tensor(entry, body, where) for name, entry in entries.items()}
        assets = {a.name: _slice(body, a.name, a.offset, a.length, where) for a in header.assets}
        if "tokenizer_model" not in assets or len(assets) != len(header.assets):
            raise ProgramError(f"{where}: the asset table needs one tokenizer_model and at most one ngram_lm")
        meta = ProgramMeta(**{k: v for k, v in header if k not in ("tensors", "assets")})
        program = cls(meta, tensors, assets["tokenizer_model"], assets.get("ngram_lm"))
        program.__dict__["sha256"] = hashlib.sha256(data).hexdigest()  # prime the cached_property
        return program

    def info(self) -> ProgramInfo:
        layout = self.layout
        return ProgramInfo(
            program_sha256=self.sha256,
            format_version=self.meta.format_version,
            program_version=self.meta.program_version,
            release_date=self.meta.release_date,
            architecture=self.meta.config.name,
            source_checksum=self.meta.source_checksum,
            weight_bytes=layout.weight_bytes,
            state_bytes_per_stream=layout.state_bytes_per_stream,
            macs_per_frame=macs_per_frame(layout),
            frame_feature_count=layout.features_per_frame * layout.feature_dim,
            blank_id=layout.blank_id,
        )


def pack(header: bytes, data: bytes) -> bytes:
    """The file around a header and a data section: preamble, both, sha256 trailer."""
    total = _PREAMBLE.size + len(header) + len(data) + _TRAILER_BYTES
    body = _PREAMBLE.pack(MAGIC, total, len(header)) + header + data
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, where: str | os.PathLike[str] = "program") -> tuple[bytes, bytes]:
    """(header, data section) of a program file whose framing, length and checksum are right."""
    head = bytes(data[: len(MAGIC)])
    if not MAGIC.startswith(head) or not head:
        raise ProgramError(f"{where}: not a Gharial program (it starts with {head!r}, not {MAGIC!r})")
    minimum = _PREAMBLE.size + _TRAILER_BYTES
    if len(data) < minimum:
        raise ProgramError(f"{where}: truncated: {len(data)} bytes, a program has at least {minimum}")
    _, total, header_length = _PREAMBLE.unpack_from(data)
    if len(data) < total:
        raise ProgramError(f"{where}: truncated: expected {total} bytes, found {len(data)}")
    if len(data) > total:
        raise ProgramError(
            f"{where}: {len(data)} bytes but its preamble says {total}: trailing bytes or a corrupt file"
        )
    stored, actual = bytes(data[-_TRAILER_BYTES:]), hashlib.sha256(data[:-_TRAILER_BYTES]).digest()
    if stored != actual:
        raise ProgramError(
            f"{where}: checksum mismatch (stored {stored.hex()[:16]}…, contents hash to "
            f"{actual.hex()[:16]}…): the file is corrupt or was modified"
        )
    header_end = _PREAMBLE.size + header_length
    if header_end > total - _TRAILER_BYTES:
        raise ProgramError(f"{where}: header length {header_length} runs past the end of the file")
    return bytes(data[_PREAMBLE.size : header_end]), bytes(data[header_end:-_TRAILER_BYTES])


def _parse_header_json(header: bytes, where: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        parsed = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgramError(f"{where}: header is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise ProgramError(f"{where}: header is a JSON {type(parsed).__name__}, not an object")
    return parsed


def _check_format_version(header: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Before the header is validated: another version may have other fields."""
    if header.get("format") != FORMAT_NAME:
        raise ProgramError(f"{where}: wrong format {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("format_version")
    if version in SUPPORTED_VERSIONS and not isinstance(version, bool):
        return
    supported = f"this gharial ({gharial.__version__}) reads format versions {list(SUPPORTED_VERSIONS)}"
    writer = header.get("program_version", "unknown")
    raise ProgramError(f"{where}: unsupported format version {version!r} (written by {writer}); {supported}")


def _check_tensors_match_layout(
    found: dict[str, tuple[str, tuple[int, ...]]], layout: ProgramLayout, where: str | os.PathLike[str]
) -> None:
    """`found` (name → dtype, shape) names exactly the layout's tensors, with their dtypes and shapes."""
    for spec in layout.tensors:
        if spec.name not in found:
            raise ProgramError(f"{where}: tensor {spec.name!r} of the layout is missing")
        dtype, shape = found[spec.name]
        if (dtype, tuple(shape)) != (spec.dtype, spec.shape):
            raise ProgramError(
                f"{where}: tensor {spec.name!r} is {dtype} {list(shape)} but the layout needs "
                f"{spec.dtype} {list(spec.shape)}"
            )
    needed = {spec.name for spec in layout.tensors}
    if extra := sorted(set(found) - needed):
        raise ProgramError(f"{where}: tensors the layout does not use: {extra[:5]}")


def _slice(body: bytes, name: str, offset: int, length: int, where: str | os.PathLike[str]) -> bytes:
    if offset + length > len(body):
        raise ProgramError(
            f"{where}: {name!r} ({length} bytes at offset {offset}) runs past the "
            f"{len(body)}-byte data section"
        )
    return body[offset : offset + length]


def _read_tensor(entry: TensorEntry, body: bytes, where: str | os.PathLike[str]) -> Tensor:
    dtype = _NUMPY_DTYPES[entry.dtype]
    count = int(np.prod(entry.shape, dtype=np.int64))
    if entry.length != count * dtype.itemsize:
        raise ProgramError(
            f"{where}: tensor {entry.name!r} has {entry.length} bytes, {entry.dtype} {list(entry.shape)} "
            f"needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(_slice(body, entry.name, entry.offset, entry.length, where), dtype=dtype)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="))).reshape(entry.shape)


def _dtype_name(t: Tensor, name: str, where: str | os.PathLike[str]) -> str:
    for dtype_name, dtype in _TORCH_DTYPES.items():
        if t.dtype == dtype:
            return dtype_name
    raise ProgramError(f"{where}: tensor {name!r} is {t.dtype}; programs hold int16 and float32")


def _summarise(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
