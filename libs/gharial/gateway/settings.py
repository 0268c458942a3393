"""The gateway's configuration, validated once at startup (flags and GHARIAL_GATEWAY_* variables
are read by `services/gateway/server.py`)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gharial.gateway.framing import FRAME_BYTES, FRAME_SECONDS

# The bundled model (models/en-small), what a stream without `model=` asks for.
DEFAULT_MODEL = "en-small"


class GatewaySettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    redis_url: str | None = Field(None, description="Redis of the load balancer (DESIGN §6)")
    transcribers: list[str] = Field(
        default_factory=list, description="static transcriber addresses, used round robin without Redis"
    )
    default_model: str = Field(DEFAULT_MODEL, min_length=1)
    max_connections: int = Field(1000, ge=1, description="open websockets per gateway; more → 503")
    max_frame_bytes: int = Field(1 << 20, ge=FRAME_BYTES, description="largest client frame; more → 1009")
    idle_timeout_s: float = Field(30.0, gt=0, description="a stream with no frame for this long is closed")
    api_key_hashes: list[str] = Field(
        default_factory=list, description="SHA-256 of accepted keys; empty: off"
    )
    failover_timeout_s: float = Field(
        15.0, gt=0, description="how long a stream whose worker failed looks for another (> the worker TTL)"
    )
    replay_window_s: float = Field(60.0, ge=FRAME_SECONDS, description="audio kept for replay, per stream")
    lease_s: float = Field(30.0, gt=0, description="load balancer claim lease, renewed every third of it")

    @model_validator(mode="after")
    def _one_source_of_workers(self) -> GatewaySettings:
        if (self.redis_url is None) == (not self.transcribers):
            raise ValueError("give either a Redis URL (load balancer) or static transcriber addresses")
        return self

    @property
    def replay_window_frames(self) -> int:
        return math.ceil(self.replay_window_s / FRAME_SECONDS)
