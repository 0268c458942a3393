"""The cycle-approximate timing model: a card profile prices a batch by walking the program's instructions.

A batch is the sequencer's work for one 60 ms frame of `streams` streams (DESIGN §4, `isa.py`): the
`encoder` kernel once over all of them, then greedy rounds of `joint` over the streams still emitting
and `predictor` over the tokens just emitted. Every instruction runs over all of a kernel's
evaluations at once, and instructions run one after the other (each LSTM step needs the last one's
output), so a batch costs the sum of its instructions:

- ``matvec`` [rows, cols] over `e` evaluations: the MAC array is a `mac_rows` x `mac_cols` tile of
  weights that takes one input vector per cycle, so a matrix costs ceil(rows/mac_rows) *
  ceil(cols/mac_cols) tiles x `e` cycles, divided by the sustained `mac_utilisation`. A weight that
  is not resident on chip is streamed from off-chip memory once per kernel launch, overlapped with
  the arithmetic: the instruction costs max(compute, streaming). Small batches are therefore bound
  by weight streaming and large ones by the MACs.
- which weights are resident: scales and biases always; then, first fit into the on-chip memory,
  the joint's and the prediction network's matrices (re-read every decoding round), then the
  encoder's, most-read first (the pre-RNN runs twice per frame), in program order. The embedding
  table stays off chip: `embed` gathers one row per evaluation.
- ``load_state``/``store_state``: float16 slot bytes per evaluation over the state memory's bandwidth.
- element-wise work (bias, add, ReLU, LSTM cell, concat, embed, argmax, and a matvec's input
  quantization and output rescaling) costs its elements per evaluation over `vector_lanes`.
- fixed costs: `batch_overhead_cycles` per batch, `kernel_launch_cycles` per kernel launch, and the
  batch's features in and tokens out over PCIe.

Nothing here is fitted per model: capacity differences between programs come from their
instructions alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gharial.accelerator.isa import (
    Add,
    AddBias,
    Argmax,
    Concat,
    Embed,
    Instruction,
    Kernel,
    LoadState,
    LstmCell,
    MatVec,
    Relu,
    StoreState,
)
from gharial.accelerator.layout import ProgramLayout
from gharial.accelerator.profile import CardProfile

Bound = Literal["compute", "weights", "state", "vector", "transfer", "overhead"]
FEATURE_BYTES = 4  # float32 features per element, host → card
TOKEN_BYTES = 4  # int32 token id per joint evaluation, card → host
STATE_ELEMENT_BYTES = 2  # state memory holds float16


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """One batch's cycles, split by what they were spent on (each part rounded up to whole cycles)."""

    streams: int
    joint_evals: int
    predictor_evals: int
    rounds: int
    clock_hz: float
    compute_cycles: int  # matvecs bound by the MAC array
    weight_cycles: int  # matvecs bound by streaming weights from off-chip memory, embedding gathers
    state_cycles: int  # state memory loads and stores
    vector_cycles: int  # element-wise work
    transfer_cycles: int  # features in and tokens out over PCIe
    overhead_cycles: int  # per-batch and per-kernel-launch fixed costs

    @property
    def cycles(self) -> int:
        """The batch's total: the sum of the parts."""
        return (
            self.compute_cycles
            + self.weight_cycles
            + self.state_cycles
            + self.vector_cycles
            + self.transfer_cycles
            + self.overhead_cycles
        )

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds

    @property
    def bound(self) -> Bound:
        """The part that took the most cycles."""
        parts: dict[Bound, float] = {
            "compute": self.compute_cycles,
            "weights": self.weight_cycles,
            "state": self.state_cycles,
            "vector": self.vector_cycles,
            "transfer": self.transfer_cycles,
            "overhead": self.overhead_cycles,
        }
        return max(parts, key=lambda k: parts[k])


@dataclass(frozen=True)
class _KernelCost:
    """A kernel's instructions reduced to what its cost depends on."""

    tiles: np.ndarray  # per matvec: MAC-array tiles, i.e. cycles per evaluation at full utilisation
    stream_cycles: np.ndarray  # per matvec: cycles to stream its weights once (0 if resident)
    vector_elements: int  # element-wise operations per evaluation
    state_bytes: int  # state memory bytes per evaluation
    gather_bytes: int  # off-chip bytes gathered per evaluation (embedding rows)


class TimingModel:
    """Prices batches of one program on one card profile."""

    def __init__(self, profile: CardProfile, layout: ProgramLayout) -> None:
        self.profile = profile
        self.layout = layout
        self.resident = _resident_weights(profile, layout)
        self._kernels = {k: self._reduce(layout.kernels[k]) for k in Kernel}
        features = layout.features_per_frame * layout.feature_dim
        self._cycles_per_byte_pcie = profile.clock_hz / profile.pcie_bytes_per_s
        self._feature_bytes = features * FEATURE_BYTES

    def state_bytes_per_stream(self, beam: int = 1) -> int:
        """State memory one stream needs: with beam width k, k copies of the prediction network's state."""
        predictor = _slots(self.layout.kernels[Kernel.PREDICTOR])
        sizes = {slot.name: STATE_ELEMENT_BYTES * slot.size for slot in self.layout.state_slots}
        return sum(size * (beam if name in predictor else 1) for name, size in sizes.items())

    def max_streams(self, beam: int = 1) -> int:
        """Streams whose state fits in the card's state memory."""
        return self.profile.state_memory_bytes // self.state_bytes_per_stream(beam)

    def batch(
        self, streams: int, joint_evals: int, predictor_evals: int, rounds: int | None = None
    ) -> BatchTiming:
        """One batch: `encoder` over `streams` frames, `joint_evals` joint and `predictor_evals`
        prediction-network evaluations over `rounds` greedy rounds (default: the fewest that fit,
        1 + ceil(predictor_evals / streams))."""
        if rounds is None:
            rounds = 1 + (math.ceil(predictor_evals / streams) if streams else 0)
        if predictor_evals and rounds < 2:
            raise ValueError("the prediction network runs after a round that emitted: rounds must be >= 2")
        parts = np.zeros(5)  # compute, weights, state, vector, launches
        for kernel, evals, runs in (
            (Kernel.ENCODER, streams, 1),
            (Kernel.JOINT, joint_evals, rounds),
            (Kernel.PREDICTOR, predictor_evals, rounds - 1),
        ):
            if evals:
                parts += self._kernel(self._kernels[kernel], evals, runs)
        transfer = (streams * self._feature_bytes + joint_evals * TOKEN_BYTES) * self._cycles_per_byte_pcie
        p = self.profile
        compute, weights, state, vector, launches = (math.ceil(x) for x in parts)
        return BatchTiming(
            streams=streams,
            joint_evals=joint_evals,
            predictor_evals=predictor_evals,
            rounds=rounds,
            clock_hz=p.clock_hz,
            compute_cycles=compute,
            weight_cycles=weights,
            state_cycles=state,
            vector_cycles=vector,
            transfer_cycles=math.ceil(transfer),
            overhead_cycles=(p.batch_overhead_cycles if streams else 0) + p.kernel_launch_cycles * launches,
        )

    def _kernel(self, cost: _KernelCost, evals: int, launches: int) -> np.ndarray:
        p = self.profile
        compute = cost.tiles * (evals / p.mac_utilisation)
        stream = cost.stream_cycles * launches
        gather = cost.gather_bytes * evals * p.clock_hz / p.off_chip_bytes_per_s
        return np.array(
            [
                compute[compute >= stream].sum(),
                stream[stream > compute].sum() + gather,
                cost.state_bytes * evals * p.clock_hz / p.state_bytes_per_s,
                cost.vector_elements * evals / p.vector_lanes,
                launches,
            ]
        )

    def _reduce(self, code: tuple[Instruction, ...]) -> _KernelCost:
        p, layout = self.profile, self.layout
        cycles_per_byte = p.clock_hz / p.off_chip_bytes_per_s
        slot_sizes = {slot.name: slot.size for slot in layout.state_slots}
        tiles, stream = [], []
        vector = state = gather = 0
        for ins in code:
            if isinstance(ins, MatVec):
                weight = layout.tensor(ins.weight)
                rows, cols = weight.shape
                tiles.append(math.ceil(rows / p.mac_rows) * math.ceil(cols / p.mac_cols))
                resident = ins.weight in self.resident
                stream.append(0.0 if resident else weight.nbytes * cycles_per_byte)
                vector += cols + rows  # quantize the input, rescale the output
            elif isinstance(ins, LoadState | StoreState):
                state += STATE_ELEMENT_BYTES * slot_sizes[ins.slot]
            elif isinstance(ins, LstmCell):
                vector += layout.registers[ins.gates] + layout.registers[ins.c]
            elif isinstance(ins, Embed):
                table = layout.tensor(ins.table)
                gather += table.nbytes // table.shape[0]  # one row
                vector += layout.registers[ins.dst]
            elif isinstance(ins, Argmax):
                vector += layout.registers[ins.src]
            elif isinstance(ins, AddBias | Add | Relu | Concat):
                vector += layout.registers[ins.dst]
        return _KernelCost(
            tiles=np.array(tiles, dtype=float),
            stream_cycles=np.array(stream, dtype=float),
            vector_elements=vector,
            state_bytes=state,
            gather_bytes=gather,
        )


def _slots(code: tuple[Instruction, ...]) -> set[str]:
    return {ins.slot for ins in code if isinstance(ins, LoadState | StoreState)}


def _resident_weights(profile: CardProfile, layout: ProgramLayout) -> frozenset[str]:
    """Matvec weights kept on chip (see the module docstring for the order)."""
    budget = profile.on_chip_weight_bytes - sum(t.nbytes for t in layout.tensors if t.role != "weight")
    candidates: list[str] = []
    for kernel in (Kernel.JOINT, Kernel.PREDICTOR, Kernel.ENCODER):
        names = [ins.weight for ins in layout.kernels[kernel] if isinstance(ins, MatVec)]
        reads = {name: names.count(name) for name in names}  # dict keeps program order
        candidates += sorted(reads, key=lambda name: -reads[name])
    resident = set()
    for name in candidates:
        size = layout.tensor(name).nbytes
        if name not in resident and size <= budget:
            resident.add(name)
            budget -= size
    return frozenset(resident)
