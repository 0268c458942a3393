"""The transcriber's Prometheus metrics (DESIGN §7), served on its /metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# A frame is due every 60 ms; the buckets resolve the DESIGN §9 targets (15 and 25 ms p99).
_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0)

STREAMS_OPEN = Gauge("gharial_transcriber_streams_open", "Streams open on this worker")
MAX_STREAMS = Gauge("gharial_transcriber_max_streams", "Streams this worker accepts at once")
DRAINING = Gauge("gharial_transcriber_draining", "1 while the worker drains (takes no new streams)")
STREAMS = Counter("gharial_transcriber_streams_total", "Streams ended, by outcome", ["outcome"])
FRAMES = Counter("gharial_transcriber_frames_total", "60 ms audio frames transcribed")
STAGE_SECONDS = Histogram(
    "gharial_transcriber_frame_stage_seconds",
    "Time per frame in each stage: features (host: audio buffered for the features), model "
    "(features computed, then the CPU step or card round trip, waiting included), decode "
    "(tokens to response)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
FRAME_SECONDS = Histogram(
    "gharial_transcriber_frame_latency_seconds",
    "Time from a frame's audio arriving to its response being ready",
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "gharial_transcriber_batch_size",
    "Frames per batch: per CPU model step, or per card batch the worker's frames ran in",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
SPEECH_LEVEL = Histogram(
    "gharial_transcriber_speech_level_dbfs",
    "Each stream's speech level at its end (mean power of its speech, dBFS, as the automatic gain "
    "measures it; streams with no speech are not counted): a quiet microphone shows up here",
    buckets=(-80, -70, -60, -55, -50, -45, -40, -35, -30, -25, -20, -15, -10),
)
INPUT_GAIN = Histogram(
    "gharial_transcriber_input_gain_db",
    "Automatic gain applied to each stream's last frame (0: its speech was at training level)",
    buckets=(0, 1, 3, 6, 10, 15, 20, 25, 30, 35, 40),
)
REJECTS = Counter("gharial_transcriber_rejects_total", "Streams refused, by reason", ["reason"])
ERRORS = Counter("gharial_transcriber_errors_total", "Streams ended by an error, by kind", ["kind"])
LICENSE_ALLOWED = Gauge(
    "gharial_transcriber_license_allowed",
    "1 if the card's licence allowed its program at start, else 0 (accelerator backend)",
    ["card_id", "verdict"],
)
