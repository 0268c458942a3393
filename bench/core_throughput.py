"""Core throughput: how many real-time streams one CPU core sustains with the batched 60 ms step.

One process, five sections:
  1. roofline: sgemm GFLOP/s (square sizes and the LSTM/joint shapes at every swept batch) and
     memory copy bandwidth, with torch's thread count;
  2. sweep: for each config and batch B, ms per `Recognizer.step` over B streams (what the servers
     run every 60 ms) and ms of the bare model math for the same B, so the recognizer's own
     overhead (state stacking, python) shows; real-time streams, streams per core, FLOPs, GFLOP/s;
  3. batching gain and roofline fraction against the issue's targets;
  4. int8 dynamic quantization: step ms and speed-up against fp32, and token agreement on speech.
Results go to a rich table per section and to one JSON file.

Random weights, two adjustments, both so that greedy decoding behaves like a real model's:
  - every weight matrix is multiplied by `--weight-gain` (default 4): with PyTorch's default init
    a random LSTM stack's output hardly depends on its input, so the joint makes the same decision
    for every stream and frame (all blank, or all tokens up to max-symbols);
  - the blank logit's bias is raised so that ~`--emit-rate` tokens are emitted per stream per frame
    (default 0.2, about 3 tokens/s, speech-like), calibrated on random features; a random model
    with a plain +4 on blank emits nothing at all, which would skip the decoder's emission rounds.
The emission rate actually measured is reported with every timing.

Run:  .venv/bin/python bench/core_throughput.py            (full sweep, ~10 min on 2 cores)
      .venv/bin/python bench/core_throughput.py --quick    (smoke run, ~1 min)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from gharial.asr.config import FRAME_MS, ModelConfig, load_model_config
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.model import RNNT, count_parameters
from gharial.asr.streaming import Recognizer
from gharial.audio import load_audio

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "core_throughput.json"
DEFAULT_MANIFEST = Path("/work/shared/data/speech-dev/manifest.json")
CONFIGS = ["small", "testing", "base"]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
INT8_BATCHES = [1, 16, 64, 256]
SQUARES = [1024, 1536, 2048]
TARGET_BATCHING_GAIN = 10.0  # base: streams per core at the largest real-time batch vs batch 1
TARGET_ROOFLINE_FRACTION = 0.6  # base: achieved GFLOP/s at that batch vs best sgemm

console = Console()


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[int], object], warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones; fn gets the call index."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return times


def p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def sustained_rate(work: Callable[[], object], units: float, seconds: float) -> float:
    """Units per second of `work`, the median of 3 windows each at least `seconds` long (so a
    one-off stall or turbo burst does not decide it)."""
    work()
    rates = []
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            work()
            n += 1
        rates.append(n * units / elapsed)
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------
# 1. roofline


def lstm_gemm_shapes(batch: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the GEMMs that dominate the base model at this batch (nn.LSTM runs x·W_ihᵀ and
    h·W_hhᵀ as separate GEMMs over 4·hidden gate columns)."""
    return {
        "lstm hh 1024→4096": (batch, 1024, 4096),
        "post ih 2048→4096": (batch, 2048, 4096),
        "joint out 768→8704": (batch, 768, 8704),
    }


def sgemm_gflops(m: int, k: int, n: int, seconds: float) -> float:
    a, w = torch.randn(m, k), torch.randn(n, k)
    return sustained_rate(lambda: torch.nn.functional.linear(a, w), 2 * m * k * n / 1e9, seconds)


def copy_bandwidth_gbs(megabytes: int, seconds: float) -> float:
    """Read + write GB/s of a large tensor copy: bounds how fast batch 1 can stream the weights."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return sustained_rate(lambda: dst.copy_(src), 2 * src.numel() * 4 / 1e9, seconds)


def measure_roofline(batches: list[int], squares: list[int], seconds: float) -> dict[str, Any]:
    shapes = [(f"square {s}", (s, s, s)) for s in squares]
    shapes += [(f"B={b} {name}", mkn) for b in batches for name, mkn in lstm_gemm_shapes(b).items()]
    rows = []
    with progress() as bar:
        task = bar.add_task("sgemm", total=len(shapes) + 1)
        for name, (m, k, n) in shapes:
            rows.append({"name": name, "m": m, "k": k, "n": n, "gflops": sgemm_gflops(m, k, n, seconds)})
            bar.advance(task)
        bandwidth = copy_bandwidth_gbs(256, seconds)
    best = max(rows, key=lambda r: r["gflops"])
    return {
        "sgemm": rows,
        "roofline_gflops": best["gflops"],
        "roofline_shape": best["name"],
        "copy_bandwidth_gbs": bandwidth,
    }


def print_roofline(roofline: dict[str, Any], batches: list[int]) -> None:
    rows = {r["name"]: r["gflops"] for r in roofline["sgemm"]}
    table = Table(title=f"1. sgemm GFLOP/s ({torch.get_num_threads()} threads, float32, median of 3 windows)")
    table.add_column("M (batch)", justify="right")
    names = list(lstm_gemm_shapes(1))
    for name in names:
        table.add_column(name, justify="right")
    for s in (r for r in roofline["sgemm"] if r["name"].startswith("square")):
        table.add_row(s["name"], *[f"{s['gflops']:.0f}" if i == 0 else "" for i in range(len(names))])
    for b in batches:
        table.add_row(str(b), *[f"{rows[f'B={b} {name}']:.1f}" for name in names])
    console.print(table)
    console.print(
        f"roofline = {roofline['roofline_gflops']:.0f} GFLOP/s ({roofline['roofline_shape']}); "
        f"copy bandwidth {roofline['copy_bandwidth_gbs']:.1f} GB/s (read + write)"
    )


# ---------------------------------------------------------------------------------------------
# model, FLOPs


def lstm_macs(input_size: int, hidden: int, layers: int) -> int:
    """Multiply-accumulates of one timestep of a stack of LSTM layers, one batch row."""
    return sum(4 * hidden * ((input_size if i == 0 else hidden) + hidden) for i in range(layers))


@dataclass
class Macs:
    """Per stream: the encoder for one 60 ms frame (+ its joint projection), one prediction-network
    step (+ projection), and one joint output layer (one emission round)."""

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
        """FLOPs of one stream's 60 ms step: the prediction network runs once per emitted token
        (counted at least once, the bare-math floor), the joint once per emission round."""
        e = emitted_per_stream
        return 2.0 * (self.encoder + max(1.0, e) * self.predictor + (1.0 + e) * self.joint)


def random_model(cfg: ModelConfig, seed: int, encoder_gain: float) -> RNNT:
    """A random RNN-T whose encoder output depends on its input (see the module docstring)."""
    torch.manual_seed(seed)
    model = RNNT(cfg).eval()
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.startswith("weight"):
                p.mul_(encoder_gain)
    return model


def set_blank_bias(model: RNNT, bias: float) -> None:
    """Add `bias` to the blank logit (on top of its random init bias, kept in model.init_blank_bias)."""
    with torch.no_grad():
        init = model.__dict__.setdefault("init_blank_bias", float(model.joint.out.bias[model.blank_id]))
        model.joint.out.bias[model.blank_id] = init + bias


def calibrate_blank_bias(model: RNNT, emit_rate: float, max_symbols: int, seed: int) -> float:
    """Bisect the blank bias until greedy steps over 32 random-feature streams emit `emit_rate`
    tokens per stream per frame (emission falls as the bias rises)."""
    low, high = -4.0, 12.0
    for _ in range(12):
        set_blank_bias(model, (low + high) / 2)
        rate = time_recognizer(model, 32, 2, 8, max_symbols, seed + 1).emitted_per_stream
        low, high = ((low + high) / 2, high) if rate > emit_rate else (low, (low + high) / 2)
    bias = (low + high) / 2
    set_blank_bias(model, bias)
    return bias


def quantize_int8(model: RNNT) -> RNNT:
    """Dynamic int8 quantization of every LSTM and Linear (weights int8, activations quantized per
    call). torch 2.13 still has the eager API under torch.ao.quantization, with a deprecation
    warning pointing at torchao. The encoder then has no float Parameter left, but
    Encoder.initial_state takes its dtype from next(parameters()), so give it an empty one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    quantized.encoder.register_parameter("float_anchor", nn.Parameter(torch.zeros(0), requires_grad=False))
    return quantized


def weight_bytes(model: RNNT) -> int:
    """Bytes a batch-1 step must read: every float weight except the embedding table."""
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


def time_recognizer(model: RNNT, batch: int, warmup: int, steps: int, seed: int) -> StepTiming:
    """`Recognizer.step` over `batch` fresh greedy streams, one call per 60 ms frame."""
    recognizer = Recognizer(model, GreedyDecoder(model))
    streams = [recognizer.new_stream() for _ in range(batch)]
    torch.manual_seed(seed)
    features = torch.randn(
        warmup + steps, batch, model.cfg.features_per_frame, model.cfg.features.feature_dim
    )
    pending = [0] * batch  # provisional tokens before the step, to count what each step emits
    emitted = [0]

    def step(i: int) -> None:
        results = recognizer.step(features[i], streams)
        new = sum(len(r.final or []) + len(r.provisional) - p for r, p in zip(results, pending, strict=True))
        pending[:] = [len(r.provisional) for r in results]
        if i >= warmup:
            emitted[0] += new

    times = time_ms(step, warmup, steps)
    return StepTiming(times, emitted[0] / (batch * steps))


def time_model_math(model: RNNT, batch: int, warmup: int, steps: int, seed: int) -> list[float]:
    """The bare math of one step on already-stacked state: encoder for one frame, one prediction
    network step and one joint, for all `batch` rows at once."""
    enc_state, pred_state = model.encoder.initial_state(batch), model.predictor.initial_state(batch)
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    torch.manual_seed(seed)
    features = torch.randn(
        warmup + steps, batch, model.cfg.features_per_frame, model.cfg.features.feature_dim
    )

    @torch.inference_mode()
    def step(i: int) -> Tensor:
        out, _ = model.encoder(features[i], enc_state)
        pred, _ = model.predictor(tokens, pred_state)
        return model.joint.combine(model.joint.enc_proj(out[:, 0]), model.joint.pred_proj(pred[:, 0]))

    return time_ms(step, warmup, steps)


def sweep_config(
    cfg: ModelConfig, model: RNNT, batches: list[int], args: dict[str, Any], roofline: dict[str, Any]
) -> dict[str, Any]:
    macs = Macs.of(cfg)
    gemm_at = {r["m"]: r["gflops"] for r in roofline["sgemm"] if "lstm hh" in r["name"]}
    rows, stopped_after = [], None
    load_before = os.getloadavg()[0]
    with progress() as bar:
        task = bar.add_task(f"{cfg.name} sweep", total=len(batches))
        for b in batches:
            step = time_recognizer(model, b, args["warmup"], args["steps"], args["seed"])
            math = time_model_math(model, b, args["warmup"], args["steps"], args["seed"])
            gflop = b * macs.step_flops(step.emitted_per_stream) / 1e9
            gflops = gflop / (step.median / 1000)
            rows.append(
                {
                    "batch": b,
                    "step_ms": step.median,
                    "step_p90_ms": step.p90,
                    "step_times_ms": step.times_ms,
                    "model_math_ms": statistics.median(math),
                    "model_math_p90_ms": p90(math),
                    "overhead_ms": step.median - statistics.median(math),
                    "emitted_per_stream_step": step.emitted_per_stream,
                    "real_time": step.median <= FRAME_MS,
                    "real_time_p90": step.p90 <= FRAME_MS,
                    "capacity_streams": b * FRAME_MS / step.median,
                    "gflop_per_step": gflop,
                    "gflops": gflops,
                    "roofline_fraction": gflops / roofline["roofline_gflops"],
                    "model_math_gflops": b * macs.step_flops(0.0) / 1e9 / (statistics.median(math) / 1000),
                    "gemm_gflops_at_batch": gemm_at.get(b),
                }
            )
            bar.advance(task)
            if step.median > args["stop_factor"] * FRAME_MS:
                stopped_after = b
                break
    threads = torch.get_num_threads()
    fitting = [r for r in rows if r["real_time"]]
    best = max(fitting, key=lambda r: r["batch"]) if fitting else None
    one = next((r for r in rows if r["batch"] == 1), None)
    batch1_streams = min(1.0, FRAME_MS / one["step_ms"]) if one else None
    max_rts = best["batch"] if best else 0
    return {
        "config": cfg.name,
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "batch1_bandwidth_floor_ms": weight_bytes(model) / (roofline["copy_bandwidth_gbs"] / 2 * 1e9) * 1000,
        "macs_per_stream": asdict(macs),
        "rows": rows,
        "stopped_after_batch": stopped_after,
        "max_rts": max_rts,
        "streams_per_core": max_rts / threads,
        "batch1_streams": batch1_streams,
        "batching_gain": max_rts / batch1_streams if batch1_streams and max_rts else None,
        "roofline_fraction_at_max_rts": best["roofline_fraction"] if best else None,
        "gflops_at_max_rts": best["gflops"] if best else None,
        "best_capacity_streams": max(r["capacity_streams"] for r in rows),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def print_sweep(result: dict[str, Any]) -> None:
    table = Table(
        title=f"2. {result['config']}: Recognizer.step (greedy) vs bare model math, ms per 60 ms step "
        f"({result['parameters'] / 1e6:.1f} M params; batch-1 bandwidth floor "
        f"{result['batch1_bandwidth_floor_ms']:.1f} ms)"
    )
    for col in [
        "B",
        "step ms",
        "p90",
        "math ms",
        "overhead",
        "tok/str/step",
        "RT",
        "capacity",
        "GFLOP/step",
        "GFLOP/s",
        "roofline",
        "gemm@B",
    ]:
        table.add_column(col, justify="right")
    for r in result["rows"]:
        gemm = r["gemm_gflops_at_batch"]
        table.add_row(
            str(r["batch"]),
            f"{r['step_ms']:.2f}",
            f"{r['step_p90_ms']:.2f}",
            f"{r['model_math_ms']:.2f}",
            f"{r['overhead_ms']:.2f} ({r['overhead_ms'] / r['step_ms']:.0%})",
            f"{r['emitted_per_stream_step']:.2f}",
            "yes" if r["real_time"] else "no",
            f"{r['capacity_streams']:.1f}",
            f"{r['gflop_per_step']:.2f}",
            f"{r['gflops']:.1f}",
            f"{r['roofline_fraction']:.1%}",
            f"{gemm:.0f}" if gemm else "-",
        )
    console.print(table)
    if result["stopped_after_batch"] is not None:
        console.print(
            f"stopped after B={result['stopped_after_batch']}: step exceeded the stop factor x 60 ms"
        )


# ---------------------------------------------------------------------------------------------
# 3. summary and targets


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    threads = torch.get_num_threads()
    table = Table(title=f"3. real-time streams (step median ≤ {FRAME_MS} ms) on {threads} threads")
    for col in [
        "config",
        "max RTS",
        "streams/core",
        "B=1 streams",
        "batching gain",
        "GFLOP/s @max",
        "roofline @max",
        "best capacity",
    ]:
        table.add_column(col, justify="right")
    for r in results:
        gain, frac = r["batching_gain"], r["roofline_fraction_at_max_rts"]
        table.add_row(
            r["config"],
            str(r["max_rts"]),
            f"{r['streams_per_core']:.1f}",
            f"{r['batch1_streams'] or 0:.2f}",
            f"{gain:.1f}x" if gain else "-",
            f"{r['gflops_at_max_rts'] or 0:.1f}",
            f"{frac:.1%}" if frac else "-",
            f"{r['best_capacity_streams']:.1f}",
        )
    console.print(table)
    console.print(
        "capacity = B x 60 / step ms: streams' worth of audio per second at that batch, ignoring latency"
    )
    base = next((r for r in results if r["config"] == "base"), None)
    targets: dict[str, Any] = {}
    if base is not None:
        gain, frac = base["batching_gain"], base["roofline_fraction_at_max_rts"]
        targets = {
            "batching_gain_base": {
                "target": TARGET_BATCHING_GAIN,
                "value": gain,
                "met": gain is not None and gain >= TARGET_BATCHING_GAIN,
            },
            "roofline_fraction_base": {
                "target": TARGET_ROOFLINE_FRACTION,
                "value": frac,
                "met": frac is not None and frac >= TARGET_ROOFLINE_FRACTION,
            },
        }
        for name, t in targets.items():
            value = "n/a (no batch fits in 60 ms)" if t["value"] is None else f"{t['value']:.3g}"
            verdict = "[green]MET[/]" if t["met"] else "[red]NOT MET[/]"
            console.print(f"target {name} ≥ {t['target']}: {value} → {verdict}")
    return targets


# ---------------------------------------------------------------------------------------------
# 4. int8


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def speech_features(cfg: ModelConfig, manifest: Path, count: int) -> list[Tensor]:
    """Features of the manifest's first `count` utterances, normalised with mel stats of those same
    utterances (as a trained model's stats would), so they look like what a real model sees."""
    entries = json.loads(manifest.read_text())[:count]
    audio = [load_audio(manifest.parent / e["files"][0]["fname"], cfg.features.sample_rate) for e in entries]
    raw = FeatureExtractor(cfg.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(a) for a in audio]))
    extractor = FeatureExtractor(cfg.features, stats)
    return [extractor(a) for a in audio]


def int8_config(cfg: ModelConfig, model: RNNT, batches: list[int], args: dict[str, Any]) -> dict[str, Any]:
    quantized = quantize_int8(model)
    rows = []
    with progress() as bar:
        task = bar.add_task(f"{cfg.name} int8", total=len(batches) + 1)
        for b in batches:
            fp32 = time_recognizer(model, b, args["warmup"], args["steps"], args["seed"])
            int8 = time_recognizer(quantized, b, args["warmup"], args["steps"], args["seed"])
            rows.append(
                {
                    "batch": b,
                    "fp32_ms": fp32.median,
                    "int8_ms": int8.median,
                    "fp32_p90_ms": fp32.p90,
                    "int8_p90_ms": int8.p90,
                    "speedup": fp32.median / int8.median,
                }
            )
            bar.advance(task)
            if fp32.median > args["stop_factor"] * FRAME_MS and int8.median > args["stop_factor"] * FRAME_MS:
                break
        errors = total = exact = emitted_int8 = frames = 0
        for features in speech_features(cfg, args["manifest"], args["utterances"]):
            ref = [t.id for t in Recognizer(model, GreedyDecoder(model)).transcribe(features)]
            hyp = [t.id for t in Recognizer(quantized, GreedyDecoder(quantized)).transcribe(features)]
            errors, total, exact = errors + edit_distance(ref, hyp), total + len(ref), exact + (ref == hyp)
            emitted_int8, frames = (
                emitted_int8 + len(hyp),
                frames + features.shape[0] // cfg.features_per_frame,
            )
        bar.advance(task)
    return {
        "config": cfg.name,
        "rows": rows,
        "utterances": args["utterances"],
        "speech_frames": frames,
        "fp32_tokens": total,
        "int8_tokens": emitted_int8,
        "token_edit_distance": errors,
        "token_agreement": 1 - errors / total if total else None,
        "identical_utterances": exact,
    }


def print_int8(results: list[dict[str, Any]]) -> None:
    table = Table(
        title="4. int8 dynamic quantization (LSTM + Linear): Recognizer.step ms and speech agreement"
    )
    for col in [
        "config",
        "B",
        "fp32 ms",
        "int8 ms",
        "speed-up",
        "agreement",
        "fp32/int8 tokens",
        "identical",
    ]:
        table.add_column(col, justify="right")
    for r in results:
        for i, row in enumerate(r["rows"]):
            agreement = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.1%}"
            first = i == 0
            table.add_row(
                r["config"] if first else "",
                str(row["batch"]),
                f"{row['fp32_ms']:.2f}",
                f"{row['int8_ms']:.2f}",
                f"{row['speedup']:.2f}x",
                agreement if first else "",
                f"{r['fp32_tokens']}/{r['int8_tokens']}" if first else "",
                f"{r['identical_utterances']}/{r['utterances']}" if first else "",
            )
    console.print(table)
    console.print(
        "agreement = 1 − token edit distance / fp32 tokens, greedy offline transcripts, same weights"
    )


# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            cpu,
        )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkl": torch.backends.mkl.is_available(),
        "quantized_engine": torch.backends.quantized.engine,
        "loadavg_start": os.getloadavg()[0],
    }


def main(
    configs: Annotated[
        list[str], typer.Option("--config", help="model config to sweep (repeatable)")
    ] = CONFIGS,
    batches: Annotated[list[int], typer.Option("--batch", help="batch size to sweep (repeatable)")] = BATCHES,
    steps: Annotated[int, typer.Option(help="timed 60 ms steps per measurement (median/p90 over them)")] = 12,
    warmup: Annotated[int, typer.Option(help="untimed steps before each measurement")] = 3,
    stop_factor: Annotated[
        float, typer.Option(help="stop growing B for a config once its step exceeds this x 60 ms")
    ] = 4.0,
    weight_gain: Annotated[
        float, typer.Option(help="multiply random weight matrices by this, so outputs depend on inputs")
    ] = 4.0,
    emit_rate: Annotated[
        float, typer.Option(help="calibrate the blank bias for ~this many tokens per stream per frame")
    ] = 0.2,
    blank_bias: Annotated[
        float | None, typer.Option(help="add this fixed bias to blank instead of calibrating to --emit-rate")
    ] = None,
    int8_batches: Annotated[
        list[int], typer.Option("--int8-batch", help="batch size for the int8 vs fp32 timing (repeatable)")
    ] = INT8_BATCHES,
    utterances: Annotated[int, typer.Option(help="speech utterances for the int8 token agreement")] = 8,
    manifest: Annotated[
        Path, typer.Option(help="speech manifest (files[0].fname relative to it)")
    ] = DEFAULT_MANIFEST,
    gemm_seconds: Annotated[
        float, typer.Option(help="seconds per sgemm timing window (3 windows each)")
    ] = 0.25,
    squares: Annotated[list[int], typer.Option("--square", help="square sgemm size (repeatable)")] = SQUARES,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's own choice)")] = None,
    seed: Annotated[int, typer.Option(help="seed for weights and features")] = 0,
    quick: Annotated[
        bool, typer.Option(help="smoke run (~1 min): B in 1/8/64, fewer steps, 2 utterances, short sgemm")
    ] = False,
    out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT,
) -> None:
    """Measure real-time streams per CPU core for the batched streaming RNN-T step (see module doc)."""
    if threads:
        torch.set_num_threads(threads)
    if quick:
        batches = [b for b in batches if b in (1, 8, 64)] or [1, 8, 64]
        int8_batches, steps, warmup, utterances, gemm_seconds, squares = [1, 64], 4, 1, 2, 0.1, [1024]
    args = {
        "steps": steps,
        "warmup": warmup,
        "stop_factor": stop_factor,
        "seed": seed,
        "utterances": utterances,
        "manifest": manifest,
    }
    machine = machine_info()
    console.print(
        f"[bold]core throughput[/] on {machine['cpu']} ({machine['cpu_count']} CPUs), "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, "
        f"load average {machine['loadavg_start']:.2f}"
    )
    if machine["loadavg_start"] > 0.5:
        console.print("[yellow]warning: the machine is not idle; timings will be pessimistic[/]")
    started = time.perf_counter()

    roofline = measure_roofline(batches, squares, gemm_seconds)
    print_roofline(roofline, batches)

    sweeps, int8 = [], []
    models: dict[str, tuple[ModelConfig, RNNT, float]] = {}
    for name in configs:
        cfg = load_model_config(name)
        model = random_model(cfg, seed, weight_gain)
        bias = blank_bias if blank_bias is not None else calibrate_blank_bias(model, emit_rate, seed)
        add_blank_bias(model, bias)
        models[name] = (cfg, model, bias)
        sweeps.append(sweep_config(cfg, model, batches, args, roofline) | {"blank_bias": bias})
        print_sweep(sweeps[-1])
    targets = summarise(sweeps)

    for cfg, model, _ in models.values():
        int8.append(int8_config(cfg, model, int8_batches, args))
    print_int8(int8)

    report = {
        "machine": machine | {"loadavg_end": os.getloadavg()[0]},
        "settings": args
        | {
            "manifest": str(manifest),
            "weight_gain": weight_gain,
            "emit_rate": emit_rate,
            "blank_bias": blank_bias,
            "batches": batches,
            "int8_batches": int8_batches,
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
