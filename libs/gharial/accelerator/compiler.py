"""The model compiler: hardware checkpoint → program (DESIGN §3).

Three steps: check that the card can run the checkpoint, `lower` its architecture to kernels
(`layout.py`), and quantize its weights into the tensors those kernels name (`quantize.py`, which
documents the number formats). Nothing depends on the clock or on hash order, so the same
checkpoint always gives a byte-identical program.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gharial.accelerator.isa import MatVec
from gharial.accelerator.layout import ProgramLayout, lower
from gharial.accelerator.program import Program, ProgramMeta
from gharial.accelerator.quantize import ACCUMULATOR_BITS, MAX_MATVEC_COLS, quantize_tensors
from gharial.asr.checkpoint import HardwareCheckpoint


class CompileError(ValueError):
    """A valid hardware checkpoint that the card cannot run; the message says why."""


def compile_checkpoint(ckpt: HardwareCheckpoint, notes: str = "") -> Program:
    """The program of a hardware checkpoint (CheckpointError if it is inconsistent, CompileError if
    the card cannot run it)."""
    ckpt.validate()
    layout = lower(ckpt.config)
    check_supported(layout, ckpt.state_dict)
    program = Program(
        ProgramMeta(
            config=ckpt.config,
            layout=layout,
            source_checksum=ckpt.checksum,
            notes=notes,
            mel_stats=ckpt.meta.mel_stats,
        ),
        quantize_tensors(layout, ckpt.state_dict),
        ckpt.tokenizer_model,
        ckpt.ngram_lm,
    )
    program.validate()
    return program


def check_supported(layout: ProgramLayout, state_dict: dict[str, Tensor]) -> None:
    """What the card's arithmetic needs beyond a consistent checkpoint."""
    name = layout.architecture
    for kernel, code in layout.kernels.items():
        for ins in code:
            if isinstance(ins, MatVec) and (cols := layout.tensor(ins.weight).shape[1]) > MAX_MATVEC_COLS:
                raise CompileError(
                    f"architecture {name!r}: {kernel} multiplies by {ins.weight!r} with {cols} columns; the "
                    f"card's {ACCUMULATOR_BITS}-bit accumulators hold dot products of at most "
                    f"{MAX_MATVEC_COLS} int16 terms"
                )
    if layout.max_symbols_per_step < 1:
        raise CompileError(f"architecture {name!r}: max_symbols_per_step must be at least 1")
    for source, tensor in state_dict.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CompileError(f"parameter {source!r} has NaN or infinite values: int16 cannot hold them")
