"""The card's number formats, and the quantization of a hardware checkpoint's weights into them.

The scheme (the arithmetic itself is specified in `isa.py` and carried out by `executor.py`):

- **Weights: int16, symmetric, one scale per output row.** ``scale = max|row| / 32767`` (a row of
  zeros gets scale 1), ``q = round_half_even(w / scale)`` in float32. An LSTM's gate matrix stacks
  four gates whose rows have very different ranges, and the joint's output rows differ per token;
  a scale per row keeps every output's error relative to its own row's range instead of the
  largest weight in the matrix, at the cost of one float32 per row. Symmetric (no zero point) so
  the MAC array multiplies plain int16 values.
- **Activations: int16, symmetric, one scale per stream and vector, chosen on the card at run time**
  (`quantize_rows` again, over each stream's input vector). No calibration data is needed and
  nothing is clipped: every frame of every stream uses its own range.
- **Accumulation: 48 bits, exact** (the width of an FPGA DSP block's accumulator). A product of two
  int16 values is at most 32,767² ≈ 2^30 in magnitude, so a dot product of up to ``MAX_MATVEC_COLS``
  (131,080) terms cannot overflow. The result is rescaled to float32 by ``s_x · s_w[row]``.
- **Why 16 bits and not 8:** with int8 weights and activations (int32 accumulation, this card's
  format until December 2026) the bundled model's greedy decisions on speech-dev disagreed with the
  float32 CPU backend's at 0.8% of its joint decisions, and because greedy decoding feeds its own
  tokens back, 27-31% of the tokens differed (two runs on 40 utterances). An ablation (the same
  40 utterances, teacher-forced) showed that both halves matter: int16 activations with int8
  weights still flipped 34 of 3,758 decisions, int16 weights with int8 activations 17; int12 ×
  int12 flipped 2, int16 × int16 none.
  The price on the card is twice the weight bytes and half the MACs per cycle (see the card
  profile); in the emulator, exact int16 products run as float64 matrix products, 2-3x slower per
  batch than int8's integer kernel (README, "Capacity").
- **Biases and all element-wise work (LSTM cell, ReLU, additions): float32.** They are a vanishing
  share of the work and the cell's nonlinearities are where fixed point would hurt most.
- **State memory: float16.** Per-stream state (LSTM h and c, the projected prediction-network
  output) is what limits how many streams a card holds; float16 halves it relative to float32 and
  keeps 11 significant bits, plenty for h (in [-1, 1]) and the slowly varying cell state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gharial.accelerator.layout import ProgramLayout, TensorSpec

QUANT_MAX = 2**15 - 1  # int16, symmetric: -32767..32767
ACCUMULATOR_BITS = 48
MAX_MATVEC_COLS = (2 ** (ACCUMULATOR_BITS - 1) - 1) // QUANT_MAX**2  # longest exact dot product


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int16 quantization of each row of x [N, D] → (int16 [N, D], float32 scales [N]).

    Used for weights (rows = output channels) by the compiler and for activations (rows = streams)
    by the card: ``x ≈ q · scale[:, None]``.
    """
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=1) / QUANT_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[:, None]).clamp_(-QUANT_MAX, QUANT_MAX)  # torch.round: half to even
    return q.to(torch.int16), scale


def quantize_tensors(layout: ProgramLayout, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor of `layout` from the checkpoint's float32 `state_dict` (see TensorSpec's roles)."""
    rows: dict[str, tuple[Tensor, Tensor]] = {}  # per source weight, quantized once for both specs

    def quantized(spec: TensorSpec) -> tuple[Tensor, Tensor]:
        (source,) = spec.sources
        if source not in rows:
            rows[source] = quantize_rows(state_dict[source])
        return rows[source]

    tensors: dict[str, Tensor] = {}
    for spec in layout.tensors:
        if spec.role == "weight":
            tensors[spec.name] = quantized(spec)[0]
        elif spec.role == "scale":
            tensors[spec.name] = quantized(spec)[1]
        else:
            total = state_dict[spec.sources[0]].to(torch.float32).clone()
            for source in spec.sources[1:]:
                total += state_dict[source]
            tensors[spec.name] = total
    return tensors
