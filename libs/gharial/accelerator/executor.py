"""The card's arithmetic: an interpreter of the instruction set (`isa.py`), batched over streams.

Each instruction is one small function over a batch of streams (rows of the card's state memory),
looked up in `_OPS` by instruction type; the greedy sequencer (`ProgramExecutor.run_batch`) runs
the kernels in the pattern `isa.py` describes. Torch on the CPU does the work.

Exactness, which the emulator's claim "the same numbers as the card" rests on:

- matvec: activations are quantized per stream (`quantize_rows`), and the int16 × int16 product
  is summed exactly. Torch has no int16 matrix product, so it runs in float64: every product
  (< 2**30) and every partial sum (< 2**47, the card's 48-bit accumulator, which the compiler
  guarantees) is an integer below 2**53, so each addition is exact and the summation order cannot
  matter (checked against int64 in the tests). The conversion of the exact sum to float32 before
  rescaling rounds to nearest once its magnitude passes 2**24, which is part of the specified
  arithmetic, not an error of the emulator.
- element-wise float32 work: additions, multiplications, divisions and comparisons are IEEE
  operations, identical whichever code path torch takes. Transcendentals are not: torch's fused
  `sigmoid` kernel computes the tail of a tensor with scalar code that differs from its vector code
  in the last bit, so a stream's result would depend on its position in the batch. The cell
  therefore uses `exp` and `tanh`, which torch evaluates with the same vector routine everywhere
  (a test checks this), and sigmoid(x) = 1 / (1 + exp(-x)).

Together: a stream's tokens and outputs are bit-identical whatever else shares its batch (a
property test checks this over random batch compositions). They are *not* bit-identical to other
hardware: exp and tanh are accurate to about one unit in the last place, and a real card would
implement them its own way.

`teacher_forced_decisions` compares the card's decisions with the float model's one by one (the
tests and bench/emulator_numerics.py use it to measure the arithmetic's fidelity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gharial.accelerator.isa import (
    Add,
    AddBias,
    Argmax,
    Concat,
    Embed,
    Kernel,
    LoadState,
    LstmCell,
    MatVec,
    Relu,
    StoreState,
)
from gharial.accelerator.layout import ENC_REGISTER, TOKEN_REGISTER, ProgramLayout, feature_register
from gharial.accelerator.program import Program
from gharial.accelerator.quantize import quantize_rows
from gharial.asr.decoding.base import predict_projected, start_of_sequence
from gharial.asr.model import RNNT


class ExecutionError(ValueError):
    """A request the card cannot run (bad rows or shapes); nothing has been changed."""


class CardState:
    """The card's state memory: one float16 tensor [capacity, size] per state slot; a stream is a row."""

    def __init__(self, layout: ProgramLayout, capacity: int) -> None:
        if capacity < 1:
            raise ExecutionError(f"state memory needs room for at least one stream, not {capacity}")
        self.capacity = capacity
        self.slots = {s.name: torch.zeros(capacity, s.size, dtype=torch.float16) for s in layout.state_slots}

    def grow(self, capacity: int) -> None:
        """Room for `capacity` rows, keeping every existing row (the emulator allocates its state
        memory as streams open rather than all of it up front)."""
        if capacity <= self.capacity:
            return
        for name, slot in self.slots.items():
            bigger = torch.zeros(capacity, slot.shape[1], dtype=slot.dtype)
            bigger[: self.capacity] = slot
            self.slots[name] = bigger
        self.capacity = capacity


@dataclass
class BatchOutput:
    tokens: list[list[int]]  # per batch row: the tokens emitted this frame (none in encoder mode)
    encoder_output: Tensor  # [B, joint hidden] float32: the `enc` register
    joint_evals: int  # stream-evaluations of the joint kernel (for the timing model)
    predictor_evals: int  # stream-evaluations of the predictor kernel


@dataclass
class _Context:
    """One kernel run: the streams' state rows, their registers and the program's tensors."""

    executor: ProgramExecutor
    state: CardState
    rows: Tensor  # LongTensor of state-memory rows, one per stream of the run
    registers: dict[str, Tensor]  # float32 [B, size]; `token` int64 [B]

    def write(self, name: str, value: Tensor) -> None:
        size = self.executor.layout.registers[name]
        if name != TOKEN_REGISTER and value.shape[1] != size:
            raise ExecutionError(f"register {name!r} holds {size} values, not {value.shape[1]}")
        self.registers[name] = value

    def tensor(self, name: str) -> Tensor:
        return self.executor.program.tensors[name]


def _load_state(ctx: _Context, ins: LoadState) -> None:
    ctx.write(ins.dst, ctx.state.slots[ins.slot][ctx.rows].to(torch.float32))


def _store_state(ctx: _Context, ins: StoreState) -> None:
    ctx.state.slots[ins.slot][ctx.rows] = ctx.registers[ins.src].to(torch.float16)


def quantized_matvec(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """The card's matvec: x [B, cols] float32 quantized per row, times int16 weight [rows, cols] with
    per-row scales [rows], exact accumulation → float32 [B, rows]. `weight` may be a float64 copy of
    the int16 values (the executor keeps one, so the conversion is not paid on every call)."""
    q, s_x = quantize_rows(x)
    acc = q.to(torch.float64) @ weight.to(torch.float64).t()  # exact: see the module docstring
    return acc.to(torch.float32) * (s_x[:, None] * scale[None, :])


def _matvec(ctx: _Context, ins: MatVec) -> None:
    out = quantized_matvec(ctx.registers[ins.src], ctx.executor.matrices[ins.weight], ctx.tensor(ins.scale))
    ctx.write(ins.dst, ctx.registers[ins.dst] + out if ins.accumulate else out)


def _add_bias(ctx: _Context, ins: AddBias) -> None:
    ctx.write(ins.dst, ctx.registers[ins.dst] + ctx.tensor(ins.bias))


def _add(ctx: _Context, ins: Add) -> None:
    ctx.write(ins.dst, ctx.registers[ins.a] + ctx.registers[ins.b])


def _relu(ctx: _Context, ins: Relu) -> None:
    ctx.write(ins.dst, ctx.registers[ins.src].clamp_min(0.0))


def _sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)): the same bits at every position of a batch (see the module docstring)."""
    return 1.0 / (1.0 + torch.exp(-x))


def _lstm_cell(ctx: _Context, ins: LstmCell) -> None:
    gates = ctx.registers[ins.gates]
    i, f, _, o = _sigmoid(gates).chunk(4, dim=1)
    g = torch.tanh(gates.chunk(4, dim=1)[2].contiguous())
    c = f * ctx.registers[ins.c] + i * g
    ctx.write(ins.c_out, c)
    ctx.write(ins.h_out, o * torch.tanh(c))


def _concat(ctx: _Context, ins: Concat) -> None:
    ctx.write(ins.dst, torch.cat([ctx.registers[s] for s in ins.srcs], dim=1))


def _embed(ctx: _Context, ins: Embed) -> None:
    token = ctx.registers[ins.token]
    is_blank = token == ctx.executor.layout.blank_id
    index = token.masked_fill(is_blank, 0)
    rows = ctx.tensor(ins.table)[index].to(torch.float32) * ctx.tensor(ins.scale)[index][:, None]
    ctx.write(ins.dst, rows.masked_fill(is_blank[:, None], 0.0))


def _argmax(ctx: _Context, ins: Argmax) -> None:
    ctx.write(ins.dst, ctx.registers[ins.src].argmax(dim=1))  # ties: the lowest index


_OPS: dict[type, Callable[[_Context, Any], None]] = {
    LoadState: _load_state,
    StoreState: _store_state,
    MatVec: _matvec,
    AddBias: _add_bias,
    Add: _add,
    Relu: _relu,
    LstmCell: _lstm_cell,
    Concat: _concat,
    Embed: _embed,
    Argmax: _argmax,
}


class ProgramExecutor:
    """Runs a program's kernels on batches of streams, as the card's sequencer does."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.layout = program.layout
        # matvec weights as float64, the product's operand type (module docstring): made once, they
        # take 4x the program's int16 bytes (en-small 40 MB, base 680 MB), and save a conversion of
        # every matrix on every kernel run
        self.matrices = {
            ins.weight: program.tensors[ins.weight].to(torch.float64)
            for code in self.layout.kernels.values()
            for ins in code
            if isinstance(ins, MatVec)
        }

    def new_state(self, capacity: int) -> CardState:
        return CardState(self.layout, capacity)

    @torch.inference_mode()
    def reset(self, state: CardState, rows: Sequence[int]) -> None:
        """Start the streams in `rows` afresh: zero their slots, then `open_stream` with token = blank."""
        index = self._rows(state, rows)
        for slot in state.slots.values():
            slot[index] = 0
        blank = torch.full((len(rows),), self.layout.blank_id, dtype=torch.long)
        self._run(Kernel.OPEN_STREAM, state, index, {TOKEN_REGISTER: blank})

    @torch.inference_mode()
    def run_batch(
        self, state: CardState, rows: Sequence[int], features: Tensor, max_symbols: Sequence[int]
    ) -> BatchOutput:
        """One 60 ms frame for each stream in `rows`: features [B, features_per_frame, feature_dim].

        max_symbols[b] == 0: encoder mode for row b (only the encoder runs; `enc` is its result);
        otherwise greedy decoding with at most that many tokens, exactly as GreedyDecoder does: rounds
        of joint → argmax, the streams that emitted a token run the predictor on it and go on.
        """
        index = self._rows(state, rows)
        layout = self.layout
        expected = (len(rows), layout.features_per_frame, layout.feature_dim)
        if tuple(features.shape) != expected or len(max_symbols) != len(rows):
            raise ExecutionError(
                f"{len(rows)} rows need features {list(expected)} and {len(rows)} max_symbols, got "
                f"{list(features.shape)} and {len(max_symbols)}"
            )
        if any(m < 0 for m in max_symbols):
            raise ExecutionError(f"max_symbols must be >= 0, got {list(max_symbols)}")
        features = features.to(torch.float32)
        registers = {feature_register(k): features[:, k] for k in range(layout.features_per_frame)}
        enc = self._run(Kernel.ENCODER, state, index, registers)[ENC_REGISTER]

        limits = torch.tensor(list(max_symbols), dtype=torch.long)
        tokens: list[list[int]] = [[] for _ in rows]
        joint_evals = predictor_evals = 0
        active = torch.nonzero(limits > 0).flatten()  # batch positions still decoding this frame
        emitted_rounds = 0
        while len(active):
            joint_evals += len(active)
            best = self._run(Kernel.JOINT, state, index[active], {ENC_REGISTER: enc[active]})[TOKEN_REGISTER]
            emitting = best != layout.blank_id
            active, best = active[emitting], best[emitting]
            if not len(active):
                break
            for b, token in zip(active.tolist(), best.tolist(), strict=True):
                tokens[b].append(token)
            predictor_evals += len(active)
            self._run(Kernel.PREDICTOR, state, index[active], {TOKEN_REGISTER: best})
            emitted_rounds += 1
            active = active[limits[active] > emitted_rounds]
        return BatchOutput(tokens, enc, joint_evals, predictor_evals)

    @torch.inference_mode()
    def run_kernel(
        self, kernel: Kernel, state: CardState, rows: Sequence[int], registers: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """One kernel on the streams in `rows` from the given input registers; returns every register.
        The sequencer's building block, public for measurements that drive the kernels themselves
        (teacher-forced decoding in bench/emulator_numerics.py)."""
        return self._run(kernel, state, self._rows(state, rows), dict(registers))

    def _run(
        self, kernel: Kernel, state: CardState, rows: Tensor, registers: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        ctx = _Context(self, state, rows, registers)
        for ins in self.layout.kernels[kernel]:
            _OPS[type(ins)](ctx, ins)
        return ctx.registers

    def _rows(self, state: CardState, rows: Sequence[int]) -> Tensor:
        if len(set(rows)) != len(rows) or any(not 0 <= r < state.capacity for r in rows):
            raise ExecutionError(f"rows must be distinct and in [0, {state.capacity}), got {list(rows)}")
        return torch.tensor(list(rows), dtype=torch.long)


class Decision(NamedTuple):
    agrees: bool  # the card chose the float model's token
    margin: float  # the float model's best minus second-best logit


@torch.inference_mode()
def teacher_forced_decisions(
    model: RNNT, executor: ProgramExecutor, features: Sequence[Tensor]
) -> list[Decision]:
    """Every joint decision of the float model's greedy decoding of each utterance (features [T, F]),
    with the card deciding from the same history: the float model's tokens are fed to both prediction
    networks. Unlike comparing transcripts, one disagreement does not change what follows, so this
    measures the arithmetic rather than a model's sensitivity to it."""
    layout = executor.layout
    per_frame = layout.features_per_frame
    state = executor.new_state(1)
    decisions = []
    for f in features:
        executor.reset(state, [0])
        encoded, _ = model.encoder(f[None])
        enc = model.joint.enc_proj(encoded[0])
        pred, pred_state = start_of_sequence(model)
        for t in range(len(enc)):
            inputs = {feature_register(k): f[t * per_frame + k][None] for k in range(per_frame)}
            card_enc = executor.run_kernel(Kernel.ENCODER, state, [0], inputs)[ENC_REGISTER]
            for _ in range(layout.max_symbols_per_step):
                logits = model.joint.combine(enc[t : t + 1], pred)[0]
                best, second = logits.topk(2).values.tolist()
                token = logits.argmax()[None]
                card = executor.run_kernel(Kernel.JOINT, state, [0], {ENC_REGISTER: card_enc})[TOKEN_REGISTER]
                decisions.append(Decision(bool(card == token), best - second))
                if token.item() == layout.blank_id:
                    break
                pred, pred_state = predict_projected(model, token, pred_state)
                executor.run_kernel(Kernel.PREDICTOR, state, [0], {TOKEN_REGISTER: token})
    return decisions
