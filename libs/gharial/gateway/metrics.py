"""The gateway's Prometheus metrics (DESIGN §7), served at the gateway's `/metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPEN = Gauge("gharial_gateway_connections_open", "Websocket connections open now")
STREAMS = Counter(
    "gharial_gateway_streams",
    "Streams ended, by outcome: completed, rejected (closed with a status), client_gone, error",
    ["outcome"],
)
REJECTS = Counter(
    "gharial_gateway_rejects", "Streams closed with an error status, by status (400, 401, 503, ...)", ["code"]
)
# What users see as latency (DESIGN §1.4): a 60 ms frame complete at the gateway → its response sent.
FRAME_LATENCY = Histogram(
    "gharial_gateway_frame_latency_seconds",
    "Time from a 60 ms frame being complete at the gateway to its response being sent",
    buckets=(0.005, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REPLAYS = Counter(
    "gharial_gateway_replays",
    "Streams moved to another worker, replaying their audio since the last final response, by the "
    "gRPC status that made them move",
    ["status"],
)
REPLAYED_FRAMES = Counter(
    "gharial_gateway_replayed_frames",
    "60 ms frames kept for replay when their stream moved to another worker",
)
REPLAY_FRAMES_DROPPED = Counter(
    "gharial_gateway_replay_frames_dropped",
    "Answered frames dropped from the replay window before a final response covered them",
)
AUDIO_BYTES = Counter("gharial_gateway_audio_bytes", "Audio bytes received from clients")
RESPONSES = Counter("gharial_gateway_responses", "Responses sent to clients, by kind", ["kind"])
