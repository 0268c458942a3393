"""Inference on CPU with prepacked weights: the same RNN-T, its matrix products ~1.3-1.8x faster.

A plain `F.linear` on CPU repacks its weight matrix into the GEMM kernel's blocked layout on
every call. At the small batches of a streaming step (a few to a few hundred rows against
matrices of 1024 x 4096) that repacking costs as much as the product itself: base's LSTM GEMM
at 64 rows reaches ~225 GFLOP/s plain and ~300 prepacked on this machine, against a 320 GFLOP/s
square-sgemm peak (`bench/core_throughput.py` measures both). oneDNN can pack a weight once and
then multiply any number of rows by it (`torch.ops.mkldnn._reorder_linear_weight` and
`_linear_pointwise`, what `torch.compile` uses for frozen CPU linears), so `prepack_for_cpu`
swaps a model's large `nn.Linear` and `nn.LSTM` layers for modules holding packed weights:

- `PackedLinear`: one packed weight and its bias;
- `PackedLSTM`: per layer, one packed weight [W_ih, W_hh] (both biases folded into one) applied
  to [x_t, h] at each timestep, then the gate arithmetic in place; the gate rows are reordered to
  i, f, o, g when packing so that one sigmoid covers three gates.

Layers with at least `PACK_MIN_WEIGHTS` weights in one matrix are always packed. Below that,
whether packing pays depends on the CPU: on the Intel Xeon of sessions 8-11 oneDNN's few-row
products lost to MKL's and the bundled en-small was no faster packed; on the AMD EPYC of session
12 the same model steps 15-40% faster with every layer packed. So each smaller layer is packed only
where a short timing trial on this machine (`packing_pays`) finds its packed twin faster.

Results equal the unpacked model's to float32 rounding (a different summation order; tests
compare both). The packed model is for inference only: no gradients, no state_dict of the
packed weights; train and export the plain model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gharial.asr.model import RNNT
from gharial.asr.streaming import fast_cpu_lstm
from gharial.plumbing.logs import log_event

log = logging.getLogger(__name__)


def can_prepack() -> bool:
    """oneDNN is part of the CPU builds of torch this project pins; guard anyway."""
    return torch.backends.mkldnn.is_available()


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux; MADV_COLLAPSE since 6.1


def pack_weight(weight: Tensor) -> Tensor:
    """A [out, in] float32 weight in oneDNN's blocked layout (valid for any number of rows; the
    second argument is only a hint for choosing the layout), backed by huge pages where it can be."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), 64)
    back_with_huge_pages(torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed))
    return packed


def back_with_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to move the whole 2 MiB pages inside [address, address + nbytes) to huge pages
    now (MADV_COLLAPSE). A step streams every weight from memory once (base: 339 MB, more than
    the caches hold), and with 4 KiB pages the TLB misses on the way cost ~3% of a base step at
    64 streams (bench/core_throughput.py, session 10). Best effort: False where the system says no
    (another OS, an older kernel, transparent huge pages off), and nothing else changes."""
    libc = _libc()
    start, end = -(-address // HUGE_PAGE) * HUGE_PAGE, (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if libc is None or end <= start:
        return False
    libc.madvise(start, end - start, MADV_HUGEPAGE)
    return libc.madvise(start, end - start, MADV_COLLAPSE) == 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or not (name := ctypes.util.find_library("c")):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def packed_product(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = pack_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return packed_product(x, self.packed, self.bias)


def _gates_ifog(tensor: Tensor, hidden: int) -> Tensor:
    """nn.LSTM's gate blocks i, f, g, o (along dim 0) reordered to i, f, o, g."""
    i, f, g, o = tensor.detach().split(hidden)
    return torch.cat([i, f, o, g])


class PackedLSTM(nn.Module):
    """A unidirectional, batch-first nn.LSTM without projections, for inference."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
            raise ValueError("PackedLSTM supports unidirectional batch-first LSTMs without projections")
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        h = lstm.hidden_size
        self.weights: list[Tensor] = []  # per layer [4H, in + H]: input and recurrent side by side
        self.biases: list[Tensor] = []
        for k in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            self.weights.append(pack_weight(torch.cat([_gates_ifog(w_ih, h), _gates_ifog(w_hh, h)], 1)))
            bias = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
            self.biases.append(_gates_ifog(bias, h))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, T, I], state (h, c) each [layers, B, H] → (y [B, T, H], (h, c)), as nn.LSTM."""
        hs, cs = [], []
        for k in range(self.num_layers):
            x, h, c = self._layer(k, x, state[0][k], state[1][k])
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))

    def _layer(self, k: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One product [x_t, h] · [W_ih, W_hh]ᵀ per timestep (a streaming step has 1-2 timesteps,
        where one product with the longer rows beats two), then the gates in place."""
        hidden = self.hidden_size
        outputs = []
        for t in range(x.shape[1]):
            gates = packed_product(torch.cat([x[:, t], h], 1), self.weights[k], self.biases[k])
            gates[:, : 3 * hidden].sigmoid_()
            gates[:, 3 * hidden :].tanh_()
            i, f, o, g = gates.split(hidden, 1)
            c = torch.addcmul(f * c, i, g)
            h = c.tanh().mul_(o)
            outputs.append(h)
        return torch.stack(outputs, 1), h, c


# Layers with at least this many weights in one matrix are packed on every CPU measured (base's
# LSTMs and joint output: 1.2-2.2x faster from 8 rows on, on the Xeon and the EPYC alike).
PACK_MIN_WEIGHTS = 2**21

TRIAL_ROWS = 32  # a mid-sized streaming batch
TRIAL_REPEATS = 15
TRIAL_MARGIN = 1.1  # packed must be this much faster: a tie keeps the plain layer

PackingTrial = Callable[[nn.LSTM | nn.Linear, nn.Module], bool]


def packed_weights(module: nn.Module) -> int:
    """The size of the largest matrix `module` would pack (an LSTM packs [W_ih, W_hh] per layer)."""
    if isinstance(module, nn.LSTM):
        layers = range(module.num_layers)
        return max(
            getattr(module, f"weight_ih_l{k}").numel() + getattr(module, f"weight_hh_l{k}").numel()
            for k in layers
        )
    return module.weight.numel() if isinstance(module, nn.Linear) else 0


@torch.inference_mode()
def packing_pays(plain: nn.LSTM | nn.Linear, packed: nn.Module, rows: int = TRIAL_ROWS) -> bool:
    """Whether `packed` runs one streaming timestep of `rows` rows at least TRIAL_MARGIN times
    faster than `plain` (an nn.LSTM or nn.Linear) on this CPU with torch's current threads: the best
    of TRIAL_REPEATS interleaved calls each, plain LSTMs with oneDNN off as `Recognizer.step` runs
    them. Either answer gives the same numbers to float rounding; only the speed is at stake."""
    if isinstance(plain, nn.LSTM):
        x = torch.randn(rows, 1, plain.input_size)
        state = (torch.zeros(plain.num_layers, rows, plain.hidden_size),) * 2
        calls = [lambda: plain(x, state), lambda: packed(x, state)]
    else:
        x = torch.randn(rows, plain.in_features)
        calls = [lambda: plain(x), lambda: packed(x)]
    best = [float("inf")] * 2
    with fast_cpu_lstm():
        for _ in range(TRIAL_REPEATS + 1):  # the first round warms up and counts like the rest
            for k, call in enumerate(calls):
                begin = time.perf_counter()
                call()
                best[k] = min(best[k], time.perf_counter() - begin)
    return best[1] * TRIAL_MARGIN < best[0]


def packed_twin(layer: nn.LSTM | nn.Linear) -> nn.Module:
    return PackedLSTM(layer) if isinstance(layer, nn.LSTM) else PackedLinear(layer)


def prepack_for_cpu(
    model: RNNT, min_weights: int = PACK_MIN_WEIGHTS, pays: PackingTrial | None = packing_pays
) -> RNNT:
    """Swap `model`'s nn.Linear and nn.LSTM layers (in place) for their packed twins: every layer
    with at least `min_weights` weights in one matrix, and each smaller one where `pays(plain,
    packed)` says packing is faster here (None: smaller layers stay plain). Returns the model, in
    eval mode. Models on other devices or dtypes, or without oneDNN, are returned as they are."""
    params = list(model.parameters())
    if not can_prepack() or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return model.eval()
    packed_by_size = packed_by_trial = kept = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if not isinstance(child, nn.LSTM | nn.Linear):
                continue
            if packed_weights(child) >= min_weights:
                packed_by_size += 1
                setattr(parent, name, packed_twin(child))
            elif pays is not None and pays(child, packed := packed_twin(child)):
                packed_by_trial += 1
                setattr(parent, name, packed)
            else:
                kept += 1
    log_event(log, "prepacked", packed_by_size=packed_by_size, packed_by_trial=packed_by_trial, plain=kept)
    return model.eval()
