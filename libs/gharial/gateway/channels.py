"""gRPC channels to the transcribers, one per address and shared by all its streams (HTTP/2
multiplexes them), created in the event loop that uses them (`grpc.aio`)."""

from __future__ import annotations

import grpc

# A worker that restarts should be reachable again within a second: gRPC's default reconnect
# backoff grows to two minutes, and every stream sent there meanwhile would fail at once.
_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Channels:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=_OPTIONS)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
