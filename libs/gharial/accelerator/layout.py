"""Lowering: an RNN-T architecture → the card's kernels, registers, state slots and tensors.

This is the code-generation half of the compiler and depends on the architecture alone (no
weights): the timing model prices a layout without ever quantizing a weight, which is how the
capacity study handles `base` and `large` cheaply. `gharial.accelerator.compiler` fills in the
tensors from a hardware checkpoint.

Naming: tensor `encoder.pre.0.w_ih` is the int16 input-to-hidden matrix of pre-RNN layer 0,
`….w_ih.scale` its per-row scales and `….bias` the float32 sum of PyTorch's two bias vectors
(`b_ih + b_hh`: the card adds one bias per gate). State slot `pre.0.h` is that layer's hidden state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

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
from gharial.asr.config import ModelConfig

TOKEN_REGISTER = "token"  # the one integer register: argmax output, predictor/embed input
ENC_REGISTER = "enc"  # joint-projected encoder output: the encoder's result
PRED_SLOT = "pred"  # joint-projected prediction-network output, kept per stream


def feature_register(k: int) -> str:
    return f"feature_{k}"


class TensorSpec(BaseModel):
    """One program constant and where its values come from in the hardware checkpoint's state dict.

    role: `weight` (int16 [rows, cols], quantized per row), `scale` (float32 [rows], the per-row
    scales of the weight of the same name without `.scale`), `bias` (float32, the sum of `sources`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Literal["weight", "scale", "bias"]
    dtype: Literal["int16", "float32"]
    shape: tuple[int, ...]
    sources: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (2 if self.dtype == "int16" else 4)


class StateSlot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: int  # float16 elements


class ProgramLayout(BaseModel):
    """Everything about a program except its tensors' values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    features_per_frame: int
    feature_dim: int
    blank_id: int
    max_symbols_per_step: int
    tensors: tuple[TensorSpec, ...]
    registers: dict[str, int]  # float32 registers and their sizes (plus `token`, size 1)
    state_slots: tuple[StateSlot, ...]
    kernels: dict[Kernel, tuple[Instruction, ...]]

    @property
    def state_bytes_per_stream(self) -> int:
        return sum(2 * slot.size for slot in self.state_slots)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)


class _Builder:
    """Collects tensors, registers and slots while the kernels are written."""

    def __init__(self) -> None:
        self.tensors: list[TensorSpec] = []
        self.registers: dict[str, int] = {TOKEN_REGISTER: 1}
        self.slots: dict[str, int] = {}

    def reg(self, name: str, size: int) -> str:
        if self.registers.setdefault(name, size) != size:
            raise ValueError(f"register {name} used with sizes {self.registers[name]} and {size}")
        return name

    def slot(self, name: str, size: int) -> str:
        self.slots.setdefault(name, size)
        return name

    def linear(self, name: str, source: str, rows: int, cols: int, bias_sources: tuple[str, ...]) -> None:
        """An int16 matrix with per-row scales, and (if `bias_sources`) a float32 bias."""
        self.tensors += [
            TensorSpec(name=name, role="weight", dtype="int16", shape=(rows, cols), sources=(source,)),
            TensorSpec(name=f"{name}.scale", role="scale", dtype="float32", shape=(rows,), sources=(source,)),
        ]
        if bias_sources:
            self.tensors.append(
                TensorSpec(
                    name=f"{name}.bias", role="bias", dtype="float32", shape=(rows,), sources=bias_sources
                )
            )

    def lstm_layer(self, prefix: str, source: str, layer: int, inputs: int, hidden: int) -> str:
        """Tensors of one nn.LSTM layer (`source` = its module path, e.g. `encoder.pre_rnn`); returns
        the program's name prefix for them."""
        name = f"{prefix}.{layer}"
        self.linear(f"{name}.w_ih", f"{source}.weight_ih_l{layer}", 4 * hidden, inputs, ())
        self.linear(f"{name}.w_hh", f"{source}.weight_hh_l{layer}", 4 * hidden, hidden, ())
        self.tensors.append(
            TensorSpec(
                name=f"{name}.bias",
                role="bias",
                dtype="float32",
                shape=(4 * hidden,),
                sources=(f"{source}.bias_ih_l{layer}", f"{source}.bias_hh_l{layer}"),
            )
        )
        return name

    def lstm_step(self, name: str, x: str, h_in: str, c: str, h_out: str, hidden: int) -> list[Instruction]:
        """One timestep of one LSTM layer: gates = W_ih·x + W_hh·h + b, then the cell update."""
        gates = self.reg(f"{name}.gates", 4 * hidden)
        return [
            MatVec(dst=gates, src=x, weight=f"{name}.w_ih", scale=f"{name}.w_ih.scale"),
            MatVec(dst=gates, src=h_in, weight=f"{name}.w_hh", scale=f"{name}.w_hh.scale", accumulate=True),
            AddBias(dst=gates, bias=f"{name}.bias"),
            LstmCell(gates=gates, c=c, h_out=self.reg(h_out, hidden), c_out=c),
        ]


def lower(cfg: ModelConfig) -> ProgramLayout:
    """The program layout of an architecture (deterministic: same config, same layout)."""
    b = _Builder()
    kernels = {
        Kernel.ENCODER: _encoder(b, cfg),
        Kernel.PREDICTOR: _predictor(b, cfg),
        Kernel.JOINT: _joint(b, cfg),
    }
    # A new stream's slots are zero; running the predictor on blank (SOS) gives its start state.
    kernels[Kernel.OPEN_STREAM] = kernels[Kernel.PREDICTOR]
    return ProgramLayout(
        architecture=cfg.name,
        features_per_frame=cfg.features_per_frame,
        feature_dim=cfg.features.feature_dim,
        blank_id=cfg.blank_id,
        max_symbols_per_step=cfg.max_symbols_per_step,
        tensors=tuple(b.tensors),
        registers=dict(b.registers),
        state_slots=tuple(StateSlot(name=n, size=s) for n, s in b.slots.items()),
        kernels={k: tuple(kernels[k]) for k in Kernel},
    )


def _recurrent_layers(
    b: _Builder, prefix: str, source: str, layers: int, inputs: int, hidden: int
) -> list[tuple[str, str, str]]:
    """(tensor prefix, h slot, c slot) per layer; loads nothing yet."""
    out = []
    for layer in range(layers):
        name = b.lstm_layer(prefix, source, layer, inputs if layer == 0 else hidden, hidden)
        out.append((name, b.slot(f"{name}.h", hidden), b.slot(f"{name}.c", hidden)))
    return out


def _load(b: _Builder, layers: list[tuple[str, str, str]], hidden: int) -> list[Instruction]:
    code: list[Instruction] = []
    for _, h, c in layers:
        code += [LoadState(dst=b.reg(h, hidden), slot=h), LoadState(dst=b.reg(c, hidden), slot=c)]
    return code


def _store(layers: list[tuple[str, str, str]]) -> list[Instruction]:
    code: list[Instruction] = []
    for _, h, c in layers:
        code += [StoreState(slot=h, src=h), StoreState(slot=c, src=c)]
    return code


def _encoder(b: _Builder, cfg: ModelConfig) -> list[Instruction]:
    """pre-RNN for each 30 ms feature of the frame → StackTime → post-RNN → joint projection."""
    enc, feature_dim = cfg.encoder, cfg.features.feature_dim
    hidden = enc.hidden
    pre = _recurrent_layers(b, "encoder.pre", "encoder.pre_rnn", enc.pre_rnn_layers, feature_dim, hidden)
    post = _recurrent_layers(
        b, "encoder.post", "encoder.post_rnn", enc.post_rnn_layers, enc.stack_time * hidden, hidden
    )
    code = _load(b, pre, hidden) + _load(b, post, hidden)
    stacked_inputs = []
    for k in range(enc.stack_time):
        x = b.reg(feature_register(k), feature_dim)
        for name, h, c in pre:
            code += b.lstm_step(name, x, h, c, h, hidden)
            x = h
        # the top layer's output at each 30 ms step is kept for StackTime
        top = b.reg(f"encoder.pre.out_{k}", hidden)
        code.append(Concat(dst=top, srcs=[x]))
        stacked_inputs.append(top)
    x = b.reg("encoder.stacked", enc.stack_time * hidden)
    code.append(Concat(dst=x, srcs=stacked_inputs))
    for name, h, c in post:
        code += b.lstm_step(name, x, h, c, h, hidden)
        x = h
    b.linear("joint.enc_proj", "joint.enc_proj.weight", cfg.joint.hidden, hidden, ("joint.enc_proj.bias",))
    code += [
        MatVec(
            dst=b.reg(ENC_REGISTER, cfg.joint.hidden),
            src=x,
            weight="joint.enc_proj",
            scale="joint.enc_proj.scale",
        ),
        AddBias(dst=ENC_REGISTER, bias="joint.enc_proj.bias"),
    ]
    return code + _store(pre) + _store(post)


def _predictor(b: _Builder, cfg: ModelConfig) -> list[Instruction]:
    """Embed `token` → prediction-network LSTM step → joint projection, kept in the `pred` slot."""
    p = cfg.predictor
    b.linear("predictor.embed", "predictor.embed.weight", cfg.vocab_size, p.hidden, ())
    layers = _recurrent_layers(b, "predictor.rnn", "predictor.rnn", p.layers, p.hidden, p.hidden)
    x = b.reg("predictor.embedded", p.hidden)
    code: list[Instruction] = [
        Embed(dst=x, token=TOKEN_REGISTER, table="predictor.embed", scale="predictor.embed.scale")
    ]
    code += _load(b, layers, p.hidden)
    for name, h, c in layers:
        code += b.lstm_step(name, x, h, c, h, p.hidden)
        x = h
    b.linear(
        "joint.pred_proj", "joint.pred_proj.weight", cfg.joint.hidden, p.hidden, ("joint.pred_proj.bias",)
    )
    pred = b.reg("predictor.projected", cfg.joint.hidden)
    code += [
        MatVec(dst=pred, src=x, weight="joint.pred_proj", scale="joint.pred_proj.scale"),
        AddBias(dst=pred, bias="joint.pred_proj.bias"),
        StoreState(slot=b.slot(PRED_SLOT, cfg.joint.hidden), src=pred),
    ]
    return code + _store(layers)


def _joint(b: _Builder, cfg: ModelConfig) -> list[Instruction]:
    """out(ReLU(enc + pred)) → argmax into `token` (blank = move on to the next frame)."""
    hidden, outputs = cfg.joint.hidden, cfg.vocab_size + 1
    b.linear("joint.out", "joint.out.weight", outputs, hidden, ("joint.out.bias",))
    pred, summed, logits = (
        b.reg("joint.pred", hidden),
        b.reg("joint.hidden", hidden),
        b.reg("joint.logits", outputs),
    )
    return [
        LoadState(dst=pred, slot=PRED_SLOT),
        Add(dst=summed, a=ENC_REGISTER, b=pred),
        Relu(dst=summed, src=summed),
        MatVec(dst=logits, src=summed, weight="joint.out", scale="joint.out.scale"),
        AddBias(dst=logits, bias="joint.out.bias"),
        Argmax(dst=TOKEN_REGISTER, src=logits),
    ]


def kernel_macs(layout: ProgramLayout, kernel: Kernel) -> int:
    """Multiply-accumulates of one stream's run of `kernel`: its matvecs' rows x columns."""
    total = 0
    for ins in layout.kernels[kernel]:
        if isinstance(ins, MatVec):
            rows, cols = layout.tensor(ins.weight).shape
            total += rows * cols
    return total


def macs_per_frame(layout: ProgramLayout) -> int:
    """MACs of one 60 ms frame for one stream: the encoder plus one decoder step (joint + predictor)."""
    return sum(kernel_macs(layout, k) for k in (Kernel.ENCODER, Kernel.JOINT, Kernel.PREDICTOR))
