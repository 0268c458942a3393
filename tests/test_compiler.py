"""The compiler: every tensor quantized from its sources as TensorSpec says, checkpoints the card cannot run
refused with a reason, and `gharial compile` end to end (good and corrupt input)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gharial.accelerator.compiler import CompileError, check_supported, compile_checkpoint
from gharial.accelerator.layout import lower
from gharial.accelerator.program import Program
from gharial.accelerator.quantize import quantize_rows
from gharial.asr.checkpoint import CheckpointError, HardwareCheckpoint
from gharial.asr.config import ModelConfig

from .test_program import tiny_checkpoint

GHARIAL = Path(sys.executable).parent / "gharial"


@pytest.fixture(scope="module")
def ckpt(tiny_tokenizer_bytes: bytes) -> HardwareCheckpoint:
    return tiny_checkpoint(tiny_tokenizer_bytes)


@pytest.fixture(scope="module")
def program(ckpt: HardwareCheckpoint) -> Program:
    return compile_checkpoint(ckpt)


def test_tensors_come_from_their_sources(ckpt: HardwareCheckpoint, program: Program) -> None:
    sd = ckpt.state_dict
    for spec in program.layout.tensors:
        tensor = program.tensors[spec.name]
        assert tensor.dtype == (torch.int16 if spec.role == "weight" else torch.float32), spec.name
        assert tuple(tensor.shape) == spec.shape, spec.name
        if spec.role == "bias":
            assert torch.equal(tensor, sum(sd[s] for s in spec.sources)), spec.name
        else:
            (source,) = spec.sources
            q, scale = quantize_rows(sd[source])
            assert torch.equal(tensor, q if spec.role == "weight" else scale), spec.name
    # e.g. the LSTM bias is b_ih + b_hh, and an int16 matrix times its scales is the float matrix
    assert torch.equal(
        program.tensors["encoder.pre.0.bias"],
        sd["encoder.pre_rnn.bias_ih_l0"] + sd["encoder.pre_rnn.bias_hh_l0"],
    )
    w = sd["joint.out.weight"]
    dequantized = program.tensors["joint.out"].float() * program.tensors["joint.out.scale"][:, None]
    assert ((dequantized - w).abs() <= program.tensors["joint.out.scale"][:, None] / 2 * 1.0001).all()
    assert (program.tensors["joint.out"].abs().amax(1) == 32767).all()  # every row uses the full range


def test_invalid_checkpoint_is_refused(ckpt: HardwareCheckpoint) -> None:
    broken = dataclasses.replace(ckpt, ngram_lm=None)  # meta still says there is one
    with pytest.raises(CheckpointError, match="has_ngram_lm=True but the n-gram LM is absent"):
        compile_checkpoint(broken)


def test_non_finite_weights_are_refused(ckpt: HardwareCheckpoint) -> None:
    state_dict = dict(ckpt.state_dict)
    state_dict["joint.out.weight"] = state_dict["joint.out.weight"].clone()
    state_dict["joint.out.weight"][3, 4] = float("nan")
    with pytest.raises(CompileError, match=r"parameter 'joint\.out\.weight' has NaN or infinite values"):
        compile_checkpoint(dataclasses.replace(ckpt, state_dict=state_dict))


def test_matvecs_longer_than_the_accumulators_hold_are_refused(
    tiny_config: ModelConfig, ckpt: HardwareCheckpoint
) -> None:
    huge = tiny_config.model_copy(
        update={"name": "huge", "encoder": tiny_config.encoder.model_copy(update={"hidden": 70_000})}
    )
    with pytest.raises(
        CompileError,
        match=r"architecture 'huge': encoder multiplies by 'encoder\.post\.0\.w_ih' with 140000 columns; "
        r"the card's 48-bit accumulators hold dot products of at most 131080 int16 terms",
    ):
        check_supported(lower(huge), ckpt.state_dict)


# --- gharial compile ----------------------------------------------------------------------------


def gharial(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GHARIAL, *map(str, args)], capture_output=True, text=True)


def test_cli_compiles(ckpt: HardwareCheckpoint, program: Program, tmp_path: Path) -> None:
    ckpt.save(tmp_path / "tiny.hwckpt")
    out = gharial("compile", tmp_path / "tiny.hwckpt", "-o", tmp_path / "tiny.program")
    assert out.returncode == 0, out.stderr
    written = Program.load(tmp_path / "tiny.program")
    assert written.sha256 == program.sha256  # the library's bytes exactly
    assert "architecture     tiny" in out.stdout
    assert f"sha256           {program.sha256}" in out.stdout
    assert f"state per stream {program.layout.state_bytes_per_stream} bytes" in out.stdout

    out = gharial(
        "compile", tmp_path / "tiny.hwckpt", "-o", tmp_path / "noted.program", "--notes", "hi", "--json"
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["architecture"] == "tiny" and info["program_sha256"] != program.sha256
    assert Program.load(tmp_path / "noted.program").meta.notes == "hi"


def test_cli_refuses_a_corrupt_checkpoint(ckpt: HardwareCheckpoint, tmp_path: Path) -> None:
    path = tmp_path / "tiny.hwckpt"
    ckpt.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = gharial("compile", path, "-o", tmp_path / "tiny.program")
    assert out.returncode == 2
    assert f"error: {path}: truncated or corrupt torch file" in out.stderr
    assert not (tmp_path / "tiny.program").exists()
