"""Core throughput: how many real-time streams one CPU core sustains with the batched 60 ms step.

One process, four sections (a rich table each, and one JSON file):
  1. roofline: sgemm GFLOP/s (square sizes, and the LSTM/joint GEMM shapes at every swept batch),
     each with a plain `F.linear` and with a weight prepacked for oneDNN, and memory read
     bandwidth, on torch's threads; the roofline is the best of all of them;
  2. sweep: for each config and batch B, ms per `Recognizer.step` over B greedy streams (what the
     servers run every 60 ms) and ms of the bare model math for the same B, so the recognizer's
     own overhead (state stacking, python) shows; real-time streams, FLOPs, GFLOP/s, roofline share.
     Each B runs three ways (`VARIANTS`): the plain model with torch's default (oneDNN on, through
     which nn.LSTM runs on CPU), the plain model with oneDNN off (oneDNN's LSTM costs milliseconds
     per call at small batches), and the model prepacked for CPU inference
     (`gharial.asr.prepacked`), which is what the servers, `transcribe` and `validate` run;
  3. max real-time streams, streams per core, batching gain and roofline fraction vs the targets;
  4. int8 dynamic quantization: step ms and speed-up vs fp32, and token agreement on real speech
     (with the prepacked fp32 model's agreement with the plain one beside it).

The weights are random, so three things make greedy decoding behave like a trained model's:
  - the encoder's weight matrices are scaled by `--encoder-gain` (2) and the joint's by
    `--joint-gain` (4): at PyTorch's default init the joint's decision hardly depends on the input,
    so it is the same for every stream and frame (a plain +4 on the blank logit makes it emit
    nothing at all, which would never run the decoder's emission rounds: prediction network, extra
    joint calls). A larger encoder gain makes the random LSTMs chaotic, so that int8's rounding
    grows through the layers (at 4, 37% error in base's encoder output instead of 2.4%);
  - a random model does not stop emitting within a frame (its prediction network does not "use
    up" a token as a trained one does): a frame that emits once mostly emits until max-symbols.
    So decoding uses `--max-symbols` 2, which gives the round structure of real speech at its
    rate (one joint over all streams, prediction network and a second joint over the few that
    emitted), where 30 would run 30 rounds per frame;
  - the blank logit's bias is bisected until the streams emit `--emit-rate` (0.2) tokens per
    stream per frame, about 3.3 tokens/s as in speech.
The emission rate measured during every timing is reported next to it. `--encoder-gain 1
--joint-gain 1 --blank-bias 4 --max-symbols 30` gives the plain "+4 on blank" setup (no tokens).

FLOPs are counted from the config (2 per multiply-accumulate; biases and element-wise work left
out): per stream the pre-RNN for its 2 feature vectors, the post-RNN for 1, the encoder's joint
projection, the prediction network (+ projection) once per emitted token but at least once (the
bare-math floor), and the joint output layer once per emission round (1 + tokens).

Run:  .venv/bin/python bench/core_throughput.py            (full sweep, ~5 min on 2 cores)
      .venv/bin/python bench/core_throughput.py --quick    (smoke run, ~1 min)
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from machine import machine_info
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from gharial.asr.config import FRAME_MS, ModelConfig, load_model_config
from gharial.asr.decoding.base import Token
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.model import RNNT, count_parameters
from gharial.asr.prepacked import pack_weight, packed_product, prepack_for_cpu
from gharial.asr.streaming import Recognizer
from gharial.audio import load_audio
from gharial.validation import edit_distance

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "core_throughput.json"
DEFAULT_MANIFEST = Path("/work/shared/data/speech-dev/manifest.json")
CONFIGS = ["small", "testing", "base"]
BATCHES = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256]
INT8_BATCHES = [1, 16, 64, 128, 256]
SQUARES = [1024, 1536, 2048]
TARGET_BATCHING_GAIN = 10.0  # base: streams per core at the largest real-time batch vs batch 1
TARGET_ROOFLINE_FRACTION = 0.6  # base: GFLOP/s achieved at that batch vs the sgemm roofline

console = Console()
if not console.is_terminal:
    console.width = 150  # piped to a file: don't squeeze the tables into 80 columns


def progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True)


def make_table(title: str, columns: str) -> Table:
    """A table whose columns are named in one '|'-separated string, all right-aligned."""
    table = Table(title=title)
    for name in columns.split("|"):
        table.add_column(name, justify="right")
    return table


# ---------------------------------------------------------------------------------------------
# timing


def p90(xs: list[float]) -> float:
    return sorted(xs)[round(0.9 * (len(xs) - 1))]


def sustained_rate(work: Callable[[], object], units: float, seconds: float) -> float:
    """Units per second of `work`: the best of 3 windows of at least `seconds` each (sustained over
    a window, and the best because other processes on a shared machine only ever slow it down)."""
    work()
    rates = []
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            work()
            n += 1
        rates.append(n * units / elapsed)
    return max(rates)


@dataclass(frozen=True)
class Variant:
    """One way of running the same fp32 model: oneDNN's global flag, and whether the model's
    weights are prepacked (`prepack_for_cpu`; its products do not depend on the flag)."""

    name: str
    onednn: bool
    prepacked: bool

    def model(self, plain: RNNT) -> RNNT:
        return prepack_for_cpu(copy.deepcopy(plain)) if self.prepacked else plain


VARIANTS = (
    Variant("onednn_on", onednn=True, prepacked=False),  # torch's default
    Variant("onednn_off", onednn=False, prepacked=False),
    Variant("prepacked", onednn=True, prepacked=True),  # what the servers run
)


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """torch.backends.mkldnn on (torch's default) or off. With it on, nn.LSTM on CPU runs through
    oneDNN, which costs milliseconds per call at small batches (bench/README.md); matmuls do not
    depend on it. Its TF32 warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=enabled):
            yield


# ---------------------------------------------------------------------------------------------
# 1. roofline


def model_gemm_shapes(batch: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the GEMMs that dominate `base` at this batch: nn.LSTM runs x·W_ihᵀ and h·W_hhᵀ
    as separate GEMMs over the 4·hidden gate columns; the joint ends in a vocab-wide layer."""
    return {
        "lstm hh 1024→4096": (batch, 1024, 4096),
        "post ih 2048→4096": (batch, 2048, 4096),
        "joint out 768→8704": (batch, 768, 8704),
    }


def sgemm_gflops(m: int, k: int, n: int, seconds: float, prepacked: bool) -> float:
    a, w = torch.randn(m, k), torch.randn(n, k)
    if prepacked:
        packed = pack_weight(w)
        return sustained_rate(lambda: packed_product(a, packed, None), 2 * m * k * n / 1e9, seconds)
    return sustained_rate(lambda: torch.nn.functional.linear(a, w), 2 * m * k * n / 1e9, seconds)


def read_bandwidth_gbs(megabytes: int, seconds: float) -> float:
    """GB/s read by summing a tensor far larger than the caches: how fast a batch-1 step, which
    uses each weight once, can stream the weights in."""
    data = torch.randn(megabytes * 2**20 // 4)
    return sustained_rate(lambda: data.sum(), data.numel() * 4 / 1e9, seconds)


def measure_roofline(batches: list[int], squares: list[int], seconds: float) -> dict[str, Any]:
    shapes = [(f"square {s}", (s, s, s)) for s in squares]
    shapes += [(f"B={b} {name}", mkn) for b in batches for name, mkn in model_gemm_shapes(b).items()]
    rows = []
    with progress() as bar:
        task = bar.add_task("sgemm", total=2 * len(shapes))
        for prepacked in (False, True):
            for name, (m, k, n) in shapes:
                gflops = sgemm_gflops(m, k, n, seconds, prepacked)
                rows.append({"name": name, "m": m, "k": k, "n": n, "prepacked": prepacked, "gflops": gflops})
                bar.advance(task)
        bandwidth = read_bandwidth_gbs(512, seconds)
    best = max(rows, key=lambda r: r["gflops"])
    return {
        "sgemm": rows,
        "roofline_gflops": best["gflops"],
        "roofline_shape": best["name"] + (", prepacked" if best["prepacked"] else ""),
        "read_bandwidth_gbs": bandwidth,
    }


def print_roofline(roofline: dict[str, Any], batches: list[int]) -> None:
    gflops = {(r["name"], r["prepacked"]): r["gflops"] for r in roofline["sgemm"]}
    names = list(model_gemm_shapes(1))
    table = make_table(
        f"1. sgemm GFLOP/s, float32, {torch.get_num_threads()} threads, [B, K] x [K, N] (model shapes), "
        "plain F.linear / weight prepacked",
        "B|" + "|".join(names),
    )
    for b in batches:
        cells = [f"{gflops[(f'B={b} {n}', False)]:.1f} / {gflops[(f'B={b} {n}', True)]:.1f}" for n in names]
        table.add_row(str(b), *cells)
    console.print(table)
    squares = ", ".join(
        f"{r['name']}{' prepacked' if r['prepacked'] else ''}: {r['gflops']:.0f}"
        for r in roofline["sgemm"]
        if "square" in r["name"]
    )
    console.print(
        f"{squares}\nroofline = {roofline['roofline_gflops']:.0f} GFLOP/s ({roofline['roofline_shape']}); "
        f"memory read bandwidth {roofline['read_bandwidth_gbs']:.1f} GB/s"
    )


# ---------------------------------------------------------------------------------------------
# model, FLOPs


def lstm_macs(input_size: int, hidden: int, layers: int) -> int:
    """Multiply-accumulates of one timestep of a stack of LSTM layers, one batch row."""
    return sum(4 * hidden * ((input_size if i == 0 else hidden) + hidden) for i in range(layers))


@dataclass
class Macs:
    """Per stream: the encoder for one 60 ms frame (+ its joint projection), one prediction-network
    step (+ its projection) and one joint output layer (one emission round)."""

    encoder: int
    predictor: int
    joint: int

    @staticmethod
    def of(cfg: ModelConfig) -> Macs:
        enc, pred, hidden = cfg.encoder, cfg.predictor, cfg.joint.hidden
        pre = cfg.features_per_frame * lstm_macs(cfg.features.feature_dim, enc.hidden, enc.pre_rnn_layers)
        post = lstm_macs(enc.stack_time * enc.hidden, enc.hidden, enc.post_rnn_layers)
        return Macs(
            encoder=pre + post + enc.hidden * hidden,
            predictor=lstm_macs(pred.hidden, pred.hidden, pred.layers) + pred.hidden * hidden,
            joint=hidden * (cfg.vocab_size + 1),
        )

    def step_flops(self, emitted_per_stream: float) -> float:
        """FLOPs of one stream's 60 ms step (see the module docstring)."""
        e = emitted_per_stream
        return 2.0 * (self.encoder + max(1.0, e) * self.predictor + (1.0 + e) * self.joint)


def random_model(cfg: ModelConfig, seed: int, encoder_gain: float, joint_gain: float) -> RNNT:
    """A random RNN-T whose joint decisions depend on its input (see the module docstring)."""
    torch.manual_seed(seed)
    model = RNNT(cfg).eval()
    with torch.no_grad():
        for module, gain in [(model.encoder, encoder_gain), (model.joint, joint_gain)]:
            for name, p in module.named_parameters():
                if "weight" in name:
                    p.mul_(gain)
    return model


def add_blank_bias(model: RNNT, bias: float) -> None:
    with torch.no_grad():
        model.joint.out.bias[model.blank_id] += bias


def bisect_blank_bias(model: RNNT, emit_rate: float, rate_of: Callable[[], float]) -> float:
    """Find the bias to add to blank for which `rate_of()` (tokens per stream per frame, falling
    as the bias rises) is `emit_rate`: 12 halvings of [-4, 12]. Leaves it added; returns it."""
    with torch.no_grad():
        out_bias, blank = model.joint.out.bias, model.blank_id
        init, low, high = float(out_bias[blank]), -4.0, 12.0
        for _ in range(12):
            out_bias[blank] = init + (low + high) / 2
            low, high = ((low + high) / 2, high) if rate_of() > emit_rate else (low, (low + high) / 2)
        out_bias[blank] = init + (low + high) / 2
    return (low + high) / 2


def quantize_int8(model: RNNT) -> RNNT:
    """A copy with every LSTM and Linear dynamically quantized (int8 weights, activations quantized
    per call). torch 2.13 still has this eager API in torch.ao.quantization (it warns that it is
    deprecated in favour of torchao)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    return quantized


def weight_bytes(model: RNNT) -> int:
    """Bytes a batch-1 step reads: every float weight except the embedding table."""
    return 4 * (count_parameters(model) - model.predictor.embed.weight.numel())


# ---------------------------------------------------------------------------------------------
# 2. the sweep


@dataclass
class StepTiming:
    times_ms: list[float]
    emitted_per_stream: float  # tokens per stream per 60 ms step, over the timed steps

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90(self) -> float:
        return p90(self.times_ms)


def random_features(model: RNNT, steps: int, batch: int, seed: int) -> Tensor:
    """[steps, batch, 2, F] standard-normal features, made before timing starts."""
    torch.manual_seed(seed)
    return torch.randn(steps, batch, model.cfg.features_per_frame, model.cfg.features.feature_dim)


Stepper = Callable[[int], int]  # runs 60 ms frame i, returns the tokens emitted


def recognizer_stepper(model: RNNT, batch: int, max_symbols: int, features: Tensor) -> Stepper:
    """`Recognizer.step` over `batch` fresh greedy streams, one call per frame of `features`."""
    recognizer = Recognizer(model, GreedyDecoder(model, max_symbols))
    streams = [recognizer.new_stream() for _ in range(batch)]
    pending = [0] * batch  # each stream's provisional tokens before the step

    def step(i: int) -> int:
        results = recognizer.step(features[i], streams)
        new = sum(len(r.final or []) + len(r.provisional) - p for r, p in zip(results, pending, strict=True))
        pending[:] = [len(r.provisional) for r in results]
        return new

    return step


def math_stepper(model: RNNT, batch: int, features: Tensor) -> Stepper:
    """The bare math of one step on already-stacked state: the encoder for one frame, one
    prediction-network step and one joint, for all `batch` rows at once."""
    enc_state, pred_state = model.encoder.initial_state(batch), model.predictor.initial_state(batch)
    tokens = torch.zeros(batch, 1, dtype=torch.long)

    @torch.inference_mode()
    def step(i: int) -> int:
        out, _ = model.encoder(features[i], enc_state)
        pred, _ = model.predictor(tokens, pred_state)
        model.joint.combine(model.joint.enc_proj(out[:, 0]), model.joint.pred_proj(pred[:, 0]))
        return 0

    return step


def time_steppers(
    steppers: dict[str, tuple[bool, Stepper]], batch: int, warmup: int, steps: int
) -> dict[str, StepTiming]:
    """Time step functions, each under its oneDNN setting, on one schedule: warm-up, then chunks
    of 4 steps of each in turn, so that a slow spell on a shared machine hits them all alike."""
    times: dict[str, list[float]] = {key: [] for key in steppers}
    emitted = dict.fromkeys(steppers, 0)
    for on, step in steppers.values():
        with onednn(on):
            for i in range(warmup):
                step(i)
    for start in range(warmup, warmup + steps, 4):
        for key, (on, step) in steppers.items():
            with onednn(on):
                for i in range(start, min(start + 4, warmup + steps)):
                    begin = time.perf_counter()
                    emitted[key] += step(i)
                    times[key].append((time.perf_counter() - begin) * 1000)
    return {key: StepTiming(times[key], emitted[key] / (batch * steps)) for key in steppers}


def time_recognizer(
    model: RNNT, batch: int, warmup: int, steps: int, max_symbols: int, seed: int, onednn_on: bool = True
) -> StepTiming:
    features = random_features(model, warmup + steps, batch, seed)
    stepper = recognizer_stepper(model, batch, max_symbols, features)
    return time_steppers({"step": (onednn_on, stepper)}, batch, warmup, steps)["step"]


def calibration_rate(model: RNNT, opts: dict[str, Any]) -> float:
    """Tokens per stream per frame over a timing-like run: 64 fresh streams, warm-up and timed
    steps (oneDNN off only because it is faster; the tokens are the same)."""
    run = time_recognizer(
        model, 64, opts["warmup"], opts["steps"], opts["max_symbols"], opts["seed"] + 1, False
    )
    return run.emitted_per_stream


def measure_batch(
    models: dict[Variant, RNNT], batch: int, opts: dict[str, Any], roofline: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows of the sweep at this batch, one per variant: Recognizer.step and bare math timed
    together, and what follows from them."""
    warmup, steps = opts["warmup"], opts["steps"]
    plain = models[VARIANTS[0]]
    features = random_features(plain, warmup + steps, batch, opts["seed"])
    steppers = {}
    for v, model in models.items():
        steppers[f"step {v.name}"] = (
            v.onednn,
            recognizer_stepper(model, batch, opts["max_symbols"], features),
        )
        steppers[f"math {v.name}"] = (v.onednn, math_stepper(model, batch, features))
    timings = time_steppers(steppers, batch, warmup, steps)
    macs, rows = Macs.of(plain.cfg), []
    for v in models:
        step, math = timings[f"step {v.name}"], timings[f"math {v.name}"].median
        gflop = batch * macs.step_flops(step.emitted_per_stream) / 1e9
        gflops = gflop / (step.median / 1000)
        rows.append(
            {
                "batch": batch,
                "variant": v.name,
                "step_ms": step.median,
                "step_p90_ms": step.p90,
                "step_times_ms": step.times_ms,
                "model_math_ms": math,
                "overhead_ms": step.median - math,
                "emitted_per_stream_step": step.emitted_per_stream,
                "real_time": step.median <= FRAME_MS,
                "real_time_p90": step.p90 <= FRAME_MS,
                "capacity_streams": batch * FRAME_MS / step.median,
                "gflop_per_step": gflop,
                "gflops": gflops,
                "roofline_fraction": gflops / roofline["roofline_gflops"],
                "model_math_gflops": batch * macs.step_flops(0.0) / 1e9 / (math / 1000),
            }
        )
    return rows


def real_time_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Max real-time streams (largest B whose median step ≤ 60 ms), batching gain over B=1 (which
    sustains 1 stream if its step fits, else the fraction 60 / step ms) and roofline share there."""
    fitting = [r for r in rows if r["real_time"]]
    best = max(fitting, key=lambda r: r["batch"]) if fitting else None
    one = next((r for r in rows if r["batch"] == 1), None)
    batch1_streams = min(1.0, FRAME_MS / one["step_ms"]) if one else None
    max_rts = best["batch"] if best else 0
    return {
        "max_rts": max_rts,
        "streams_per_core": max_rts / torch.get_num_threads(),
        "batch1_streams": batch1_streams,
        "batching_gain": max_rts / batch1_streams if batch1_streams and max_rts else None,
        "step_ms_at_max_rts": best["step_ms"] if best else None,
        "gflops_at_max_rts": best["gflops"] if best else None,
        "roofline_fraction_at_max_rts": best["roofline_fraction"] if best else None,
        "best_capacity_streams": max(r["capacity_streams"] for r in rows),
    }


def sweep_config(
    cfg: ModelConfig, model: RNNT, batches: list[int], opts: dict[str, Any], roofline: dict[str, Any]
) -> dict[str, Any]:
    """Time every batch size, each variant, until every variant's step exceeds stop_factor x 60 ms."""
    rows: list[dict[str, Any]] = []
    stopped_after, load_before = None, os.getloadavg()[0]
    models = {v: v.model(model) for v in VARIANTS}
    with progress() as bar:
        task = bar.add_task(f"{cfg.name} sweep", total=len(batches))
        for b in batches:
            rows += measure_batch(models, b, opts, roofline)
            bar.advance(task)
            if min(r["step_ms"] for r in rows[-len(VARIANTS) :]) > opts["stop_factor"] * FRAME_MS:
                stopped_after = b
                break
    return {
        "config": cfg.name,
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "batch1_bandwidth_floor_ms": weight_bytes(model) / (roofline["read_bandwidth_gbs"] * 1e9) * 1000,
        "macs_per_stream": asdict(Macs.of(cfg)),
        "rows": rows,
        "stopped_after_batch": stopped_after,
        "summary": {v.name: real_time_summary([r for r in rows if r["variant"] == v.name]) for v in VARIANTS},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def print_sweep(result: dict[str, Any], roofline: dict[str, Any]) -> None:
    gemm_at = {(r["m"], r["prepacked"]): r["gflops"] for r in roofline["sgemm"] if "lstm hh" in r["name"]}
    table = make_table(
        f"2. {result['config']} ({result['parameters'] / 1e6:.1f} M params, blank bias "
        f"{result['blank_bias']:+.2f}): ms per Recognizer.step (greedy) vs bare model math; "
        f"batch-1 weight-streaming floor {result['batch1_bandwidth_floor_ms']:.1f} ms",
        "B|variant|step ms|p90 ms|math ms|overhead|tok/stream|≤60ms|capacity|"
        "GFLOP/step|GFLOP/s|roofline|sgemm@B",
    )
    for r in result["rows"]:
        first, last = r["variant"] == VARIANTS[0].name, r["variant"] == VARIANTS[-1].name
        gemm = gemm_at.get((r["batch"], r["variant"] == "prepacked"))
        table.add_row(
            str(r["batch"]) if first else "",
            r["variant"],
            f"{r['step_ms']:.2f}",
            f"{r['step_p90_ms']:.2f}",
            f"{r['model_math_ms']:.2f}",
            f"{r['overhead_ms']:.2f} ({r['overhead_ms'] / r['step_ms']:.0%})",
            f"{r['emitted_per_stream_step']:.2f}",
            "yes" if r["real_time"] else "no",
            f"{r['capacity_streams']:.1f}",
            f"{r['gflop_per_step']:.3f}",
            f"{r['gflops']:.1f}",
            f"{r['roofline_fraction']:.1%}",
            f"{gemm:.0f}" if gemm and r["variant"] != "onednn_off" else "",
            end_section=last,
        )
    console.print(table)
    if result["stopped_after_batch"] is not None:
        console.print(
            f"stopped after B={result['stopped_after_batch']}: its step exceeded stop-factor x 60 ms"
        )


# ---------------------------------------------------------------------------------------------
# 3. summary and targets


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    table = make_table(
        f"3. real-time streams (median step ≤ {FRAME_MS} ms) on {torch.get_num_threads()} threads",
        "config|variant|max RTS|step ms|streams/core|B=1 streams|batching gain|GFLOP/s|roofline|"
        "best capacity",
    )
    for r in results:
        for variant in VARIANTS:
            v = r["summary"][variant.name]
            gain, frac, step = v["batching_gain"], v["roofline_fraction_at_max_rts"], v["step_ms_at_max_rts"]
            table.add_row(
                r["config"] if variant == VARIANTS[0] else "",
                variant.name,
                str(v["max_rts"]),
                f"{step:.1f}" if step else "-",
                f"{v['streams_per_core']:.1f}",
                f"{v['batch1_streams'] or 0:.2f}",
                f"{gain:.1f}x" if gain else "-",
                f"{v['gflops_at_max_rts'] or 0:.1f}",
                f"{frac:.1%}" if frac else "-",
                f"{v['best_capacity_streams']:.1f}",
                end_section=variant == VARIANTS[-1],
            )
    console.print(table)
    console.print(
        "GFLOP/s and roofline at max RTS; capacity = B x 60 / step ms (streams' worth of audio per second "
        "at that B, latency aside)"
    )
    base = next((r for r in results if r["config"] == "base"), None)
    if base is None:
        return {}
    targets: dict[str, Any] = {}
    for variant in VARIANTS:
        v = base["summary"][variant.name]
        for name, key, target in [
            ("batching_gain_base", "batching_gain", TARGET_BATCHING_GAIN),
            ("roofline_fraction_base", "roofline_fraction_at_max_rts", TARGET_ROOFLINE_FRACTION),
        ]:
            value = v[key]
            met = value is not None and value >= target
            targets[f"{name}_{variant.name}"] = {"target": target, "value": value, "met": met}
            shown = "n/a (no batch fits in 60 ms)" if value is None else f"{value:.3g}"
            verdict = "[green]MET[/]" if met else "[red]NOT MET[/]"
            console.print(f"target {name} ≥ {target} ({variant.name}): {shown} → {verdict}")
    return targets


# ---------------------------------------------------------------------------------------------
# 4. int8


def speech_features(cfg: ModelConfig, manifest: Path, count: int) -> list[Tensor]:
    """Features of the manifest's first `count` utterances, normalised with mel stats of those same
    utterances (as a trained model's stats would be), so that they look like what a model sees."""
    entries = json.loads(manifest.read_text())[:count]
    audio = [load_audio(manifest.parent / e["files"][0]["fname"], cfg.features.sample_rate) for e in entries]
    raw = FeatureExtractor(cfg.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(a) for a in audio]))
    extractor = FeatureExtractor(cfg.features, stats)
    return [extractor(a) for a in audio]


@torch.inference_mode()
def decode_speech(model: RNNT, speech: list[Tensor], max_symbols: int) -> list[list[int]]:
    """Greedy token ids of each utterance, decoded together as streams with Recognizer.step (the
    same tokens as transcribe, but one weight pass per frame for all utterances, not one each)."""
    recognizer = Recognizer(model, GreedyDecoder(model, max_symbols))
    streams = [recognizer.new_stream() for _ in speech]
    frames = [f.reshape(-1, model.cfg.features_per_frame, f.shape[-1]) for f in speech]
    tokens: list[list[Token]] = [[] for _ in speech]
    for t in range(max(len(f) for f in frames)):
        live = [i for i, f in enumerate(frames) if t < len(f)]
        results = recognizer.step(torch.stack([frames[i][t] for i in live]), [streams[i] for i in live])
        for i, result in zip(live, results, strict=True):
            tokens[i] += result.final or []
    return [[t.id for t in tokens[i] + recognizer.finish(stream)] for i, stream in enumerate(streams)]


@torch.inference_mode()
def frame_agreement(model: RNNT, quantized: RNNT, speech: list[Tensor]) -> tuple[float, float | None]:
    """(relative L2 error of int8's projected encoder output, agreement of the first joint decision
    in each frame, from the start-of-sequence prediction state, over the frames where either model
    emits a token). Both leave out the error propagation of whole transcripts: one flipped
    decision changes the prediction network's state and with it everything after it."""
    batch = torch.nn.utils.rnn.pad_sequence(speech, batch_first=True)
    lengths = torch.tensor([len(f) // model.cfg.features_per_frame for f in speech])
    sos = torch.full((1, 1), model.blank_id)
    projected, decisions = [], []
    for m in (model, quantized):
        enc = m.joint.enc_proj(m.encoder(batch)[0])
        enc = enc[torch.arange(enc.shape[1]) < lengths[:, None]]  # real frames only, [frames, hidden]
        projected.append(enc)
        decisions.append(m.joint.combine(enc, m.joint.pred_proj(m.predictor(sos)[0][0])).argmax(-1))
    error = float((projected[0] - projected[1]).norm() / projected[0].norm())
    emitting = (decisions[0] != model.blank_id) | (decisions[1] != model.blank_id)
    agreement = float((decisions[0] == decisions[1])[emitting].float().mean()) if emitting.any() else None
    return error, agreement


def int8_config(cfg: ModelConfig, model: RNNT, batches: list[int], opts: dict[str, Any]) -> dict[str, Any]:
    """fp32 vs int8 step times at a few batch sizes, then agreement on speech. Speech makes these
    random models emit far more than random features do, so the agreement runs on a copy whose
    blank bias is bisected again for the same emission rate on speech (fp32); int8 is made from it."""
    quantized, prepacked = quantize_int8(model), prepack_for_cpu(copy.deepcopy(model))
    warmup, steps, seed, max_symbols = opts["warmup"], opts["steps"], opts["seed"], opts["max_symbols"]
    rows = []
    with progress() as bar:
        task = bar.add_task(f"{cfg.name} int8", total=len(batches) + 1)
        for b in batches:
            features = random_features(model, warmup + steps, b, seed)
            timings = time_steppers(
                {
                    "fp32": (True, recognizer_stepper(model, b, max_symbols, features)),
                    "fp32 off": (False, recognizer_stepper(model, b, max_symbols, features)),
                    "fp32 prepacked": (True, recognizer_stepper(prepacked, b, max_symbols, features)),
                    "int8": (True, recognizer_stepper(quantized, b, max_symbols, features)),
                },
                b,
                warmup,
                steps,
            )
            fp32, fp32_off, int8 = timings["fp32"], timings["fp32 off"], timings["int8"]
            fp32_packed = timings["fp32 prepacked"]
            rows.append(
                {
                    "batch": b,
                    "fp32_ms": fp32.median,
                    "fp32_onednn_off_ms": fp32_off.median,
                    "fp32_prepacked_ms": fp32_packed.median,
                    "int8_ms": int8.median,
                    "fp32_p90_ms": fp32.p90,
                    "fp32_onednn_off_p90_ms": fp32_off.p90,
                    "int8_p90_ms": int8.p90,
                    "speedup": fp32.median / int8.median,
                    "speedup_vs_onednn_off": fp32_off.median / int8.median,
                    "speedup_vs_prepacked": fp32_packed.median / int8.median,
                    "fp32_tokens_per_stream": fp32.emitted_per_stream,
                    "int8_tokens_per_stream": int8.emitted_per_stream,
                }
            )
            bar.advance(task)
            if int8.median > opts["stop_factor"] * FRAME_MS:
                break
        speech = speech_features(cfg, opts["manifest"], opts["utterances"])
        frames = sum(f.shape[0] // cfg.features_per_frame for f in speech)
        speech_model = copy.deepcopy(model)
        with onednn(False):  # faster, and fp32 either way
            speech_bias = bisect_blank_bias(
                speech_model,
                opts["emit_rate"],
                lambda: sum(map(len, decode_speech(speech_model, speech, max_symbols))) / frames,
            )
            speech_quantized = quantize_int8(speech_model)
            ref = decode_speech(speech_model, speech, max_symbols)
            hyp = decode_speech(speech_quantized, speech, max_symbols)
            packed_hyp = decode_speech(prepack_for_cpu(copy.deepcopy(speech_model)), speech, max_symbols)
            enc_error, decision_agreement = frame_agreement(speech_model, speech_quantized, speech)
        bar.advance(task)
    return {
        "config": cfg.name,
        "rows": rows,
        "utterances": len(speech),
        "speech_frames": frames,
        "speech_blank_bias": speech_bias,
        "fp32_tokens": sum(map(len, ref)),
        "int8_tokens": sum(map(len, hyp)),
        **token_agreement(ref, hyp),
        "prepacked": token_agreement(ref, packed_hyp),
        "int8_max_rts": max((r["batch"] for r in rows if r["int8_ms"] <= FRAME_MS), default=0),
        "encoder_relative_error": enc_error,
        "first_decision_agreement": decision_agreement,
    }


def token_agreement(ref: list[list[int]], hyp: list[list[int]]) -> dict[str, Any]:
    """1 − Σ edit distance / Σ longer transcript's length, and the identical utterances."""
    errors = sum(edit_distance(r, h) for r, h in zip(ref, hyp, strict=True))
    longer = sum(max(len(r), len(h)) for r, h in zip(ref, hyp, strict=True))
    return {
        "token_edit_distance": errors,
        "token_agreement": 1 - errors / longer if longer else None,
        "identical_utterances": sum(r == h for r, h in zip(ref, hyp, strict=True)),
    }


def print_int8(results: list[dict[str, Any]]) -> None:
    table = make_table(
        "4. int8 dynamic quantization (LSTM + Linear) vs fp32: Recognizer.step ms; agreement on speech",
        "config|B|fp32 ms|fp32 ms, oneDNN off|fp32 ms, prepacked|int8 ms|speed-up|speed-up vs off|"
        "speed-up vs prepacked|token agreement|"
        "fp32/int8 tokens|identical utts|frame decisions|enc rel err",
    )
    for r in results:
        agreement = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.1%}"
        summary = [
            agreement,
            f"{r['fp32_tokens']}/{r['int8_tokens']}",
            f"{r['identical_utterances']}/{r['utterances']}",
            "-" if r["first_decision_agreement"] is None else f"{r['first_decision_agreement']:.1%}",
            f"{r['encoder_relative_error']:.2%}",
        ]
        for i, row in enumerate(r["rows"]):
            first = i == 0
            table.add_row(
                r["config"] if first else "",
                str(row["batch"]),
                f"{row['fp32_ms']:.2f}",
                f"{row['fp32_onednn_off_ms']:.2f}",
                f"{row['fp32_prepacked_ms']:.2f}",
                f"{row['int8_ms']:.2f}",
                f"{row['speedup']:.2f}x",
                f"{row['speedup_vs_onednn_off']:.2f}x",
                f"{row['speedup_vs_prepacked']:.2f}x",
                *(summary if first else []),
                end_section=i == len(r["rows"]) - 1,
            )
    console.print(table)
    fitting = ", ".join(f"{r['config']} {r['int8_max_rts']}" for r in results)
    console.print(f"int8: largest measured B with a median step ≤ {FRAME_MS} ms: {fitting}")
    packed = ", ".join(
        f"{r['config']} {r['prepacked']['token_agreement'] or 0:.1%} "
        f"({r['prepacked']['identical_utterances']}/{r['utterances']} identical)"
        for r in results
    )
    console.print(f"prepacked fp32 vs plain fp32, token agreement on the same speech: {packed}")
    console.print(
        "token agreement = 1 − Σ edit distance / Σ longer transcript's length; greedy, same weights,\n"
        "blank bias bisected on speech; frame decisions = same first joint decision per frame (from the\n"
        "start state; frames where either emits), no error propagation; enc rel err = ‖int8 − fp32‖ / ‖fp32‖"
    )


# ---------------------------------------------------------------------------------------------


def main(
    configs: Annotated[
        list[str], typer.Option("--config", help="model config to sweep; repeat for several")
    ] = CONFIGS,
    batches: Annotated[
        list[int], typer.Option("--batch", help="batch size to sweep; repeat for several")
    ] = BATCHES,
    steps: Annotated[
        int, typer.Option(help="timed 60 ms steps per measurement (median and p90 over them)")
    ] = 12,
    warmup: Annotated[int, typer.Option(help="untimed steps before each measurement")] = 3,
    stop_factor: Annotated[
        float, typer.Option(help="stop growing B for a config once its median step exceeds this x 60 ms")
    ] = 4.0,
    encoder_gain: Annotated[
        float, typer.Option(help="scale the random encoder weights (decisions then depend on the input)")
    ] = 2.0,
    joint_gain: Annotated[float, typer.Option(help="scale the random joint weights (likewise)")] = 4.0,
    max_symbols: Annotated[
        int, typer.Option(help="greedy decoder's max tokens per frame (see module doc)")
    ] = 2,
    emit_rate: Annotated[
        float, typer.Option(help="bisect the blank bias to emit this many tokens per stream per frame")
    ] = 0.2,
    blank_bias: Annotated[
        float | None, typer.Option(help="add this fixed bias to blank instead of bisecting for --emit-rate")
    ] = None,
    int8_batches: Annotated[
        list[int],
        typer.Option("--int8-batch", help="batch size for the int8 vs fp32 timing; repeat for several"),
    ] = INT8_BATCHES,
    utterances: Annotated[int, typer.Option(help="speech utterances for the int8 token agreement")] = 16,
    manifest: Annotated[
        Path, typer.Option(help="speech manifest (JSON list; files[0].fname relative to it)")
    ] = DEFAULT_MANIFEST,
    gemm_seconds: Annotated[
        float, typer.Option(help="seconds per sgemm timing window (best of 3 windows)")
    ] = 0.25,
    squares: Annotated[
        list[int], typer.Option("--square", help="square sgemm size; repeat for several")
    ] = SQUARES,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's own choice)")] = None,
    seed: Annotated[int, typer.Option(help="seed for weights and features")] = 0,
    quick: Annotated[
        bool, typer.Option(help="smoke run (~1 min): B 1/8/64, 4 steps, 2 utterances, short sgemm")
    ] = False,
    out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT,
) -> None:
    """Real-time streams per CPU core for the batched streaming RNN-T step (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    if quick:
        batches = [b for b in batches if b in (1, 8, 64)] or [1, 8, 64]
        int8_batches, steps, warmup, utterances, gemm_seconds, squares = [1, 64], 4, 1, 2, 0.1, [1024]
    opts = {
        "steps": steps,
        "warmup": warmup,
        "stop_factor": stop_factor,
        "max_symbols": max_symbols,
        "seed": seed,
        "utterances": utterances,
        "manifest": manifest,
        "emit_rate": emit_rate,
    }
    machine = machine_info()
    console.print(
        f"[bold]core throughput[/] on {machine['cpu']} ({machine['cpu_count']} CPUs), "
        f"torch {machine['torch']} on {machine['torch_threads']} threads, "
        f"load average {machine['loadavg_start']:.2f}"
    )
    if machine["loadavg_start"] > 0.5:
        console.print(
            "[yellow]warning: the machine is busy (load average > 0.5); timings will be pessimistic[/]"
        )
    started = time.perf_counter()

    roofline = measure_roofline(batches, squares, gemm_seconds)
    print_roofline(roofline, batches)

    sweeps, models = [], []
    for name in configs:
        cfg = load_model_config(name)
        model = random_model(cfg, seed, encoder_gain, joint_gain)
        if blank_bias is None:
            with console.status(
                f"{name}: bisecting the blank bias for {emit_rate} tokens per stream per frame"
            ):
                bias = bisect_blank_bias(model, emit_rate, lambda m=model: calibration_rate(m, opts))
        else:
            bias = blank_bias
            add_blank_bias(model, bias)
        models.append((cfg, model))
        sweeps.append(sweep_config(cfg, model, batches, opts, roofline) | {"blank_bias": bias})
        print_sweep(sweeps[-1], roofline)
    targets = summarise(sweeps)

    int8 = [int8_config(cfg, model, int8_batches, opts) for cfg, model in models]
    print_int8(int8)

    report = {
        "machine": machine | {"loadavg_end": os.getloadavg()[0]},
        "settings": opts
        | {
            "manifest": str(manifest),
            "configs": configs,
            "batches": batches,
            "int8_batches": int8_batches,
            "encoder_gain": encoder_gain,
            "joint_gain": joint_gain,
            "emit_rate": emit_rate,
            "blank_bias": blank_bias,
            "quick": quick,
            "frame_ms": FRAME_MS,
        },
        "roofline": roofline,
        "configs": sweeps,
        "targets": targets,
        "int8": int8,
        "elapsed_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    typer.run(main)
