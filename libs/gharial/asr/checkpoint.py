"""Hardware checkpoints: what `export` makes from a training checkpoint (DESIGN §3).

A hardware checkpoint is everything needed to run a trained model and nothing needed to train it:
the EMA weights (CPU, float32), the mel stats, the sentencepiece model bytes, an optional n-gram LM
(KenLM ARPA or binary, as bytes), the RNN-T config and provenance. The CPU backend runs it directly
and the compiler turns it into a program.

On disk it is one `torch.save` of a plain dict::

    {"meta": <JSON of HardwareCheckpointMeta>,  # format name and version, config, mel stats, provenance
     "state_dict": {name: float32 Tensor},
     "tokenizer_model": bytes,
     "ngram_lm": bytes | None,
     "checksum": <sha256 hex>}

Why this shape:
- It is loaded with ``torch.load(weights_only=True)``: only tensors and plain containers can come out
  of the file, so a checkpoint downloaded from anywhere cannot execute code on the machine loading it.
  The meta travels as a JSON string (not pickled objects) for the same reason, and is then checked by
  pydantic.
- The sha256 covers the meta, every tensor (name, dtype, shape, bytes) and both byte blobs, so bit-rot
  or a hand-edited file is reported as such instead of as a subtly wrong model.
- Everything is checked against the config on save and on load (keys, shapes, mel bins, tokenizer
  vocabulary), so an inconsistent checkpoint is never written and fails loudly when read.

`format_version` is bumped whenever the layout changes; loading refuses versions it does not know.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

import gharial
from gharial.asr.config import ModelConfig
from gharial.asr.features import MelStats
from gharial.asr.model import RNNT
from gharial.files import atomic_write

FORMAT_NAME: Final = "gharial-hardware-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (FORMAT_VERSION,)  # versions `load` reads
FILE_KEYS = ("meta", "state_dict", "tokenizer_model", "ngram_lm", "checksum")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PICKLE_MAGIC = b"\x80"  # the legacy (pre-1.6) torch.save format starts with a pickle protocol opcode
_TRAINING_KEYS = {"optimizer", "ema", "ema_state_dict", "step", "epoch", "scheduler", "model"}


class CheckpointError(ValueError):
    """A hardware checkpoint that cannot be written or read; the message names the file and the problem."""


class HardwareCheckpointMeta(BaseModel):
    """Everything in a hardware checkpoint except the weights and the byte blobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["gharial-hardware-checkpoint"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    gharial_version: str = gharial.__version__
    created: str  # ISO 8601, UTC
    config: ModelConfig
    mel_stats: MelStats
    has_ngram_lm: bool
    training_step: int | None = None
    source: str = ""  # where it came from, e.g. the training checkpoint's path
    notes: str | None = None


@dataclasses.dataclass
class HardwareCheckpoint:
    """A model ready to run: EMA weights + everything the host needs around them (see module docstring)."""

    meta: HardwareCheckpointMeta
    state_dict: dict[str, Tensor]
    tokenizer_model: bytes
    ngram_lm: bytes | None = None

    @classmethod
    def from_model(
        cls,
        model: RNNT,
        mel_stats: MelStats,
        tokenizer_model: bytes,
        ngram_lm: bytes | None = None,
        training_step: int | None = None,
        source: str = "",
        notes: str | None = None,
    ) -> HardwareCheckpoint:
        """Snapshot `model` (pass the EMA model) as CPU float32 copies, independent of later training."""
        meta = HardwareCheckpointMeta(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            config=model.cfg,
            mel_stats=mel_stats,
            has_ngram_lm=ngram_lm is not None,
            training_step=training_step,
            source=source,
            notes=notes,
        )
        state_dict = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
        return cls(meta, state_dict, bytes(tokenizer_model), None if ngram_lm is None else bytes(ngram_lm))

    @property
    def config(self) -> ModelConfig:
        return self.meta.config

    @property
    def checksum(self) -> str:
        """sha256 hex of the contents (the value stored in the file): lets a program name its source."""
        meta = self.meta.model_dump(mode="json")
        return compute_checksum(meta, self.state_dict, self.tokenizer_model, self.ngram_lm)

    def validate(self, where: str | os.PathLike[str] = "hardware checkpoint") -> None:
        """Check the parts against each other and the config; raise CheckpointError naming `where`."""
        cfg = self.meta.config
        if self.meta.format_version != FORMAT_VERSION:
            version = self.meta.format_version
            raise CheckpointError(f"{where}: format_version {version}, this gharial writes {FORMAT_VERSION}")
        _check_state_dict(self.state_dict, cfg, where)
        bins, n_mels = len(self.meta.mel_stats.mean), cfg.features.n_mels
        if bins != n_mels:
            raise CheckpointError(
                f"{where}: mel stats have {bins} bins, config {cfg.name!r} has n_mels={n_mels}"
            )
        if self.meta.has_ngram_lm != (self.ngram_lm is not None):
            raise CheckpointError(
                f"{where}: meta says has_ngram_lm={self.meta.has_ngram_lm} but the n-gram LM is "
                f"{'absent' if self.ngram_lm is None else 'present'}"
            )
        if self.ngram_lm is not None and len(self.ngram_lm) == 0:
            raise CheckpointError(f"{where}: the n-gram LM is empty (use None for no LM)")
        _check_tokenizer(self.tokenizer_model, cfg, where)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Validate, then write atomically (temp file + rename) so a crash never leaves a truncated file."""
        path = Path(path)
        self.validate(path)
        meta = self.meta.model_dump(mode="json")
        contents = {
            "meta": json.dumps(meta),
            "state_dict": self.state_dict,
            "tokenizer_model": self.tokenizer_model,
            "ngram_lm": self.ngram_lm,
            "checksum": compute_checksum(meta, self.state_dict, self.tokenizer_model, self.ngram_lm),
        }
        with atomic_write(path) as f:
            torch.save(contents, f)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardwareCheckpoint:
        """Read and fully check a hardware checkpoint; every problem is a CheckpointError naming `path`."""
        path = Path(path)
        contents = _read_torch_file(path)
        _check_layout(contents, path)
        meta_dict = _parse_meta_json(contents["meta"], path)
        _check_format_version(meta_dict, path)
        state_dict, tokenizer_model, ngram_lm = (
            contents["state_dict"],
            contents["tokenizer_model"],
            contents["ngram_lm"],
        )
        stored = contents["checksum"]
        actual = compute_checksum(meta_dict, state_dict, tokenizer_model, ngram_lm)
        if stored != actual:
            raise CheckpointError(
                f"{path}: checksum mismatch (stored {stored[:16]}…, contents hash to {actual[:16]}…): "
                "the file is corrupt or was modified"
            )
        try:
            meta = HardwareCheckpointMeta.model_validate(meta_dict)
        except ValidationError as e:
            raise CheckpointError(f"{path}: invalid meta: {_summarise(e)}") from e
        ckpt = cls(meta, state_dict, tokenizer_model, ngram_lm)
        ckpt.validate(path)
        return ckpt

    def build_model(self) -> RNNT:
        """The RNN-T with these weights, in eval mode, on the CPU."""
        model = RNNT(self.meta.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def compute_checksum(
    meta: dict[str, Any], state_dict: dict[str, Tensor], tokenizer_model: bytes, ngram_lm: bytes | None
) -> str:
    """sha256 hex over the canonical JSON of `meta`, every tensor (sorted by name) and the byte blobs.

    Each field is length-prefixed so no two different contents can hash the same stream of bytes.
    """
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    put(str(len(state_dict)).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        put(name.encode())
        put(f"{t.dtype}{list(t.shape)}".encode())
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    put(tokenizer_model)
    put(b"\x00" if ngram_lm is None else b"\x01" + ngram_lm)
    return h.hexdigest()


def _read_torch_file(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise CheckpointError(
                f"{path}: not a hardware checkpoint: it holds Python objects ({found.group(1)}) that are "
                "not loaded for safety (weights_only)"
            ) from e
        if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(
                f"{path}: truncated or corrupt torch file ({path.stat().st_size} bytes): {_first_line(e)}"
            ) from e
        # torch's own message here suggests weights_only=False, which is exactly what must not be done
        raise CheckpointError(f"{path}: not a torch file (it starts with {head!r})") from e


def _check_layout(contents: Any, path: Path) -> None:
    """The top-level dict has exactly our keys with the right types (before anything is hashed)."""
    if not isinstance(contents, dict):
        found = type(contents).__name__
        raise CheckpointError(f"{path}: not a hardware checkpoint: found a {found}, not a dict")
    keys = sorted(map(str, contents))
    if "meta" not in contents:
        hint = (
            "; this looks like a training checkpoint: export it to a hardware checkpoint first"
            if _TRAINING_KEYS & set(keys)
            else ""
        )
        raise CheckpointError(f"{path}: not a hardware checkpoint: found a dict with keys {_few(keys)}{hint}")
    if missing := [k for k in FILE_KEYS if k not in contents]:
        raise CheckpointError(f"{path}: hardware checkpoint lacks {missing}")
    if extra := [k for k in keys if k not in FILE_KEYS]:
        raise CheckpointError(f"{path}: hardware checkpoint has unknown entries {_few(extra)}")
    expected = {
        "meta": (str,),
        "state_dict": (dict,),
        "tokenizer_model": (bytes,),
        "ngram_lm": (bytes, type(None)),
        "checksum": (str,),
    }
    for key, types in expected.items():
        if not isinstance(contents[key], types):
            raise CheckpointError(f"{path}: {key!r} is a {type(contents[key]).__name__}")
    state_dict = contents["state_dict"]
    if bad := [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, Tensor))]:
        raise CheckpointError(f"{path}: state_dict entries that are not named tensors: {_few(map(str, bad))}")


def _parse_meta_json(text: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: meta is not valid JSON ({e}): the file is corrupt") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta is a JSON {type(meta).__name__}, not an object")
    return meta


def _check_format_version(meta: dict[str, Any], path: Path) -> None:
    """Checked before the checksum: a newer version may hash (or lay out) its contents differently."""
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: wrong format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version is {version!r}, not an integer")
    if version in SUPPORTED_VERSIONS:
        return
    supported = f"this gharial ({gharial.__version__}) reads format versions {list(SUPPORTED_VERSIONS)}"
    if version > FORMAT_VERSION:
        writer = meta.get("gharial_version", "unknown")
        raise CheckpointError(
            f"{path}: format version {version} was written by a newer gharial ({writer}); {supported}"
        )
    raise CheckpointError(f"{path}: unsupported format version {version}; {supported}")


def _check_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig, where: str | os.PathLike[str]) -> None:
    """Same keys and shapes as RNNT(cfg), float32. The reference is built on the meta device: no memory."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RNNT(cfg).state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys {_few(unexpected)}")
        raise CheckpointError(f"{where}: weights do not match config {cfg.name!r}: {'; '.join(problems)}")
    for name, shape in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: parameter {name!r} has shape {list(t.shape)} but config {cfg.name!r} "
                f"needs {list(shape)}"
            )
        if t.dtype != torch.float32:
            raise CheckpointError(f"{where}: parameter {name!r} is {t.dtype}, expected torch.float32")


def _check_tokenizer(model_bytes: bytes, cfg: ModelConfig, where: str | os.PathLike[str]) -> None:
    from gharial.asr.tokenizer import Tokenizer  # lazily: sentencepiece is only needed here

    try:
        tokenizer = Tokenizer.from_bytes(model_bytes)
    except ValueError as e:
        raise CheckpointError(f"{where}: tokenizer model ({len(model_bytes)} bytes) is invalid: {e}") from e
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer vocabulary has {tokenizer.vocab_size} pieces but config {cfg.name!r} "
            f"has vocab_size={cfg.vocab_size}"
        )


def _few(items: Any, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return f"[{shown}{', …' if len(items) > n else ''}]"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _summarise(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
