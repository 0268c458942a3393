"""Program files: a round trip keeps everything, the same checkpoint always compiles to the same bytes,
and every way a file can be wrong fails with a ProgramError that names the file and the problem."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gharial
from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.isa import Kernel
from gharial.accelerator.layout import ProgramLayout, lower, macs_per_frame
from gharial.accelerator.program import FORMAT_VERSION, Program, ProgramError, ProgramInfo, pack, unpack
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import ModelConfig
from gharial.asr.features import MelStats
from gharial.asr.model import RNNT

from .conftest import emitting_model

ARPA = b"\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\n-0.5\t</s>\n-0.3\thello\n\n\\end\\\n"


def checkpoint_of(model: RNNT, tokenizer_bytes: bytes, ngram_lm: bytes | None = ARPA) -> HardwareCheckpoint:
    n = model.cfg.features.n_mels
    stats = MelStats(mean=[0.1 * i for i in range(n)], var=[1.0 + 0.01 * i for i in range(n)])
    return HardwareCheckpoint.from_model(model, stats, tokenizer_bytes, ngram_lm=ngram_lm, source="test")


def tiny_checkpoint(tokenizer_bytes: bytes, ngram_lm: bytes | None = ARPA) -> HardwareCheckpoint:
    """A hardware checkpoint of the tiny config whose model emits tokens (see conftest.emitting_model)."""
    return checkpoint_of(emitting_model(), tokenizer_bytes, ngram_lm)


@pytest.fixture(scope="module")
def ckpt(tiny_tokenizer_bytes: bytes) -> HardwareCheckpoint:
    return tiny_checkpoint(tiny_tokenizer_bytes)


@pytest.fixture(scope="module")
def program(ckpt: HardwareCheckpoint) -> Program:
    return compile_checkpoint(ckpt, notes="unit test")


@pytest.fixture
def saved(program: Program, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.program"
    program.save(path)
    return path


def rewrite_header(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit a saved program's JSON header and store it with correct lengths and checksum, so the check
    under test is the one that fires rather than the framing or the checksum."""
    header, data = unpack(path.read_bytes())
    fields = json.loads(header)
    change(fields)
    path.write_bytes(pack(json.dumps(fields).encode(), data))


# --- round trip and determinism -----------------------------------------------------------------


def test_round_trip(program: Program, ckpt: HardwareCheckpoint, saved: Path) -> None:
    loaded = Program.load(saved)
    assert loaded.meta == program.meta
    assert loaded.meta.format_version == FORMAT_VERSION
    assert loaded.meta.program_version == gharial.__version__
    assert loaded.meta.release_date == gharial.RELEASE_DATE
    assert loaded.meta.source_checksum == ckpt.checksum
    assert loaded.meta.notes == "unit test"
    assert loaded.meta.mel_stats == ckpt.meta.mel_stats
    assert loaded.tokenizer_model == ckpt.tokenizer_model
    assert loaded.ngram_lm == ARPA
    assert loaded.tensors.keys() == program.tensors.keys()
    for name, tensor in program.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.sha256 == program.sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert list(saved.parent.iterdir()) == [saved]  # the atomic write left no temp file


def test_round_trip_without_lm(tiny_tokenizer_bytes: bytes) -> None:
    program = compile_checkpoint(tiny_checkpoint(tiny_tokenizer_bytes, ngram_lm=None))
    loaded = Program.from_bytes(program.to_bytes())
    assert loaded.ngram_lm is None
    assert loaded.tokenizer_model == tiny_tokenizer_bytes


def test_layout_survives_json(tiny_config: ModelConfig) -> None:
    layout = lower(tiny_config)
    assert ProgramLayout.model_validate_json(layout.model_dump_json()) == layout


def test_same_checkpoint_same_bytes(ckpt: HardwareCheckpoint, program: Program, tmp_path: Path) -> None:
    assert compile_checkpoint(ckpt, notes="unit test").to_bytes() == program.to_bytes()
    ckpt.save(tmp_path / "tiny.hwckpt")
    script = (
        "import sys; from gharial.asr.checkpoint import HardwareCheckpoint; "
        "from gharial.accelerator.compiler import compile_checkpoint; "
        "print(compile_checkpoint(HardwareCheckpoint.load(sys.argv[1]), notes='unit test').sha256)"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, tmp_path / "tiny.hwckpt"], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == program.sha256


def test_info(program: Program, ckpt: HardwareCheckpoint) -> None:
    info = program.info()
    layout, cfg = program.layout, ckpt.config
    expected_macs = 0
    for kernel in (Kernel.ENCODER, Kernel.JOINT, Kernel.PREDICTOR):
        for ins in layout.kernels[kernel]:
            if ins.op == "matvec":
                expected_macs += program.tensors[ins.weight].numel()
    assert info == ProgramInfo(
        program_sha256=program.sha256,
        format_version=FORMAT_VERSION,
        program_version=gharial.__version__,
        release_date=gharial.RELEASE_DATE,
        architecture="tiny",
        source_checksum=ckpt.checksum,
        weight_bytes=sum(t.numel() * t.element_size() for t in program.tensors.values()),
        state_bytes_per_stream=2 * sum(s.size for s in layout.state_slots),
        macs_per_frame=expected_macs,
        frame_feature_count=2 * cfg.features.feature_dim,
        blank_id=cfg.vocab_size,
    )
    assert macs_per_frame(layout) == expected_macs
    # the encoder's matvecs run once per 30 ms feature in the pre-RNN: more MACs than weights
    assert expected_macs > sum(program.tensors[s.name].numel() for s in layout.tensors if s.role == "weight")


# --- bad files ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match=r"nope\.program: no such file"):
        Program.load(tmp_path / "nope.program")


def test_wrong_magic(saved: Path, ckpt: HardwareCheckpoint) -> None:
    ckpt.save(saved)  # a hardware checkpoint where a program should be
    with pytest.raises(ProgramError, match=r"tiny\.program: not a Gharial program \(it starts with b'PK"):
        Program.load(saved)


def test_empty_file(saved: Path) -> None:
    saved.write_bytes(b"")
    with pytest.raises(ProgramError, match="not a Gharial program"):
        Program.load(saved)


def test_truncated(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:-1000])
    with pytest.raises(
        ProgramError, match=rf"tiny\.program: truncated: expected {len(data)} bytes, found {len(data) - 1000}"
    ):
        Program.load(saved)
    saved.write_bytes(data[:20])
    with pytest.raises(ProgramError, match=r"truncated: 20 bytes, a program has at least 56"):
        Program.load(saved)


def test_trailing_bytes(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data + b"\n")
    with pytest.raises(ProgramError, match=rf"{len(data) + 1} bytes but its preamble says {len(data)}"):
        Program.load(saved)


@pytest.mark.parametrize("where", [100, -5000, -33])  # header, tensor data, last data byte
def test_flipped_byte(saved: Path, where: int) -> None:
    data = bytearray(saved.read_bytes())
    data[where] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ProgramError, match=r"tiny\.program: checksum mismatch .*corrupt or was modified"):
        Program.load(saved)


def test_unknown_format_version(saved: Path) -> None:
    rewrite_header(saved, lambda h: h.update(format_version=99, program_version="9.9.9"))
    with pytest.raises(
        ProgramError,
        match=r"tiny\.program: unsupported format version 99 \(written by 9\.9\.9\); "
        r"this gharial \(0\.1\.0\) reads format versions \[2\]",
    ):
        Program.load(saved)


def test_wrong_format_name(saved: Path) -> None:
    rewrite_header(saved, lambda h: h.update(format="gharial-hardware-checkpoint"))
    with pytest.raises(ProgramError, match="wrong format 'gharial-hardware-checkpoint'"):
        Program.load(saved)


def test_header_not_json(saved: Path) -> None:
    header, data = unpack(saved.read_bytes())
    saved.write_bytes(pack(header[:-2], data))
    with pytest.raises(ProgramError, match="header is not valid JSON"):
        Program.load(saved)


def test_invalid_header(saved: Path) -> None:
    def change(h: dict[str, Any]) -> None:
        h["colour"] = "green"
        del h["source_checksum"]

    rewrite_header(saved, change)
    with pytest.raises(
        ProgramError, match=r"invalid header: source_checksum: Field required; colour: Extra inputs"
    ):
        Program.load(saved)


def test_missing_tensor(saved: Path) -> None:
    rewrite_header(saved, lambda h: h.update(tensors=[t for t in h["tensors"] if t["name"] != "joint.out"]))
    with pytest.raises(ProgramError, match=r"tiny\.program: tensor 'joint\.out' of the layout is missing"):
        Program.load(saved)


def test_tensor_of_wrong_shape(saved: Path) -> None:
    def change(h: dict[str, Any]) -> None:
        (entry,) = [t for t in h["tensors"] if t["name"] == "joint.out"]
        entry["shape"] = [16, 96]

    rewrite_header(saved, change)
    with pytest.raises(
        ProgramError, match=r"tensor 'joint\.out' is int16 \[16, 96\] but the layout needs int16 \[32, 48\]"
    ):
        Program.load(saved)


def test_int8_program_of_format_1_is_refused_by_version(saved: Path) -> None:
    """Programs before December 2026 held int8 weights: their version, not their tensors, refuses them."""
    rewrite_header(saved, lambda h: h.update(format_version=1))
    with pytest.raises(ProgramError, match=r"unsupported format version 1 .*reads format versions \[2\]"):
        Program.load(saved)


def test_unknown_tensor(saved: Path) -> None:
    rewrite_header(saved, lambda h: h["tensors"].append({**h["tensors"][0], "name": "extra"}))
    with pytest.raises(ProgramError, match=r"tensors the layout does not use: \['extra'\]"):
        Program.load(saved)


def test_tensor_past_the_data(saved: Path) -> None:
    def change(h: dict[str, Any]) -> None:
        h["tensors"][-1]["offset"] += 10**6

    rewrite_header(saved, change)
    with pytest.raises(ProgramError, match=r"runs past the \d+-byte data section"):
        Program.load(saved)


def test_missing_tokenizer(saved: Path) -> None:
    rewrite_header(saved, lambda h: h.update(assets=[a for a in h["assets"] if a["name"] == "ngram_lm"]))
    with pytest.raises(ProgramError, match="the asset table needs one tokenizer_model"):
        Program.load(saved)


def test_save_refuses_tensors_that_do_not_match(program: Program, tmp_path: Path) -> None:
    broken = Program(program.meta, {**program.tensors, "joint.out": torch.zeros(3, 3)}, b"")
    with pytest.raises(ProgramError, match=r"tensor 'joint\.out' is float32 \[3, 3\] but the layout needs"):
        broken.save(tmp_path / "broken.program")
    assert not list(tmp_path.iterdir())
