"""The accelerator's instruction set: what a compiled program tells the card to do.

A program (see `program.py`) holds quantized tensors and four *kernels*, each a straight-line list
of the instructions below. The card's sequencer runs them in a fixed pattern (DESIGN §4):

    open_stream    once when a stream opens (and on a state reset): initialise its state
    encoder        once per 60 ms frame: features → joint-projected encoder output `enc`
    joint          per decoder step: `enc` + `pred` → `token` (argmax; blank = no emission)
    predictor      after each emitted token: `token` → new `pred` (and prediction-network state)

Greedy decoding is `encoder`, then up to `max_symbols` rounds of `joint` and, for the streams
that emitted a token, `predictor`. In encoder mode only `encoder` runs and `enc` goes to the host.

Every instruction works on all streams of a batch at once. Operands are named *registers* (one
float32 vector per stream, sizes declared in the program; they live for one frame, across its
kernels), named *state slots* (per-stream vectors kept in the card's state memory between
frames) and named *tensors* (the program's constants).

Kernel inputs and outputs are fixed registers: the sequencer writes the frame's features into
`feature_0`, `feature_1`, ... (one per 30 ms feature vector) before `encoder`, which leaves the
joint-projected encoder output in `enc`; `joint` leaves its argmax in the integer register
`token`; `predictor` reads `token`. A newly opened (or reset) stream's state slots are zero, then
`open_stream` runs with `token` = blank (start of sequence).

The arithmetic, which the emulator reproduces exactly:

- ``matvec``: the source vector is quantized to int16 per stream with a symmetric scale
  ``s_x = max|x| / 32767`` (1 when x is all zeros), multiplied by an int16 weight matrix with exact
  48-bit accumulation, and rescaled to float32 by ``s_x · s_w[row]`` (per-output-row weight scales).
  ``accumulate`` adds the result to `dst` instead of overwriting it.
- ``add_bias``, ``add``, ``relu``, ``lstm_cell``, ``concat``: float32, as written.
- ``lstm_cell``: gates in PyTorch order (input, forget, cell, output):
  ``c' = σ(f)·c + σ(i)·tanh(g)``, ``h' = σ(o)·tanh(c')``.
- ``embed``: row `token` of an int16 table times its row scale; the blank id (start of sequence)
  embeds to zeros.
- ``load_state``/``store_state``: state memory holds float16, so a value stored and loaded
  again is rounded to float16.
- ``argmax``: index of the largest element (ties: the lowest index) into an integer register.

The timing model reads the same instructions: matvec shapes give multiply-accumulates and weight
bytes, state instructions give state-memory traffic, the rest are vector operations.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Kernel(StrEnum):
    OPEN_STREAM = "open_stream"
    ENCODER = "encoder"
    JOINT = "joint"
    PREDICTOR = "predictor"


class _Instruction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadState(_Instruction):
    """register `dst` ← the stream's state slot `slot`."""

    op: Literal["load_state"] = "load_state"
    dst: str
    slot: str


class StoreState(_Instruction):
    """the stream's state slot `slot` ← register `src` (rounded to float16)."""

    op: Literal["store_state"] = "store_state"
    slot: str
    src: str


class MatVec(_Instruction):
    """`dst` (+)= dequantize(weight_int16 · quantize_int16(`src`)); weight [rows, cols], scale [rows]."""

    op: Literal["matvec"] = "matvec"
    dst: str
    src: str
    weight: str
    scale: str
    accumulate: bool = False


class AddBias(_Instruction):
    """`dst` += tensor `bias` (float32)."""

    op: Literal["add_bias"] = "add_bias"
    dst: str
    bias: str


class Add(_Instruction):
    """`dst` = `a` + `b`."""

    op: Literal["add"] = "add"
    dst: str
    a: str
    b: str


class Relu(_Instruction):
    op: Literal["relu"] = "relu"
    dst: str
    src: str


class LstmCell(_Instruction):
    """(`h_out`, `c_out`) = LSTM cell update from `gates` [4H] and the previous cell `c` [H]."""

    op: Literal["lstm_cell"] = "lstm_cell"
    gates: str
    c: str
    h_out: str
    c_out: str


class Concat(_Instruction):
    """`dst` = the registers `srcs` end to end (StackTime)."""

    op: Literal["concat"] = "concat"
    dst: str
    srcs: list[str]


class Embed(_Instruction):
    """`dst` = table[`token`] · scale[`token`], zeros where `token` is the blank id."""

    op: Literal["embed"] = "embed"
    dst: str
    token: str
    table: str
    scale: str


class Argmax(_Instruction):
    """integer register `dst` = argmax of `src`."""

    op: Literal["argmax"] = "argmax"
    dst: str
    src: str


Instruction = Annotated[
    LoadState | StoreState | MatVec | AddBias | Add | Relu | LstmCell | Concat | Embed | Argmax,
    Field(discriminator="op"),
]
