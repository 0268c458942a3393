"""Choosing the transcriber (card worker) for a stream.

`BalancedWorkers` claims a slot through the Redis load balancer (DESIGN §6) and renews the leases of
its open streams; `StaticWorkers` round-robins over a fixed list of addresses (development, tests,
single-worker setups) and learns that a worker is full from its RESOURCE_EXHAUSTED answer.
`LoadBalancer` is synchronous, so its calls run in the event loop's thread pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import grpc
from pydantic import BaseModel

from gharial.balancer import BalancerUnavailable, Claim, LoadBalancer
from gharial.gateway.channels import Channels
from gharial.plumbing.logs import log_event
from gharial.protos import transcriber_pb2, transcriber_pb2_grpc

log = logging.getLogger(__name__)

READINESS_TIMEOUT_S = 1.0


class NoWorker(Exception):
    """No worker can take the stream now (→ "503")."""


class UnknownModel(Exception):
    """No live worker serves the requested model (→ "400")."""


@dataclass(frozen=True)
class Lease:
    """A worker's address, held for one stream until released."""

    address: str
    claim: Claim | None = None


class Readiness(BaseModel):
    ready: bool
    detail: str


class Workers(ABC):
    # How many workers may answer "full" before a stream concludes that all of them are.
    candidates: int

    @abstractmethod
    async def claim(self, model: str, avoid: frozenset[str] = frozenset()) -> Lease:
        """A worker for a stream of `model`, preferring any whose address is not in `avoid` (those
        that just failed the stream); raises `NoWorker` or `UnknownModel`."""

    @abstractmethod
    async def release(self, lease: Lease) -> None: ...

    @abstractmethod
    async def readiness(self) -> Readiness:
        """Whether new streams can be placed (`/readyz`)."""

    @abstractmethod
    async def maintain(self) -> None:
        """Background upkeep for the gateway's lifetime (cancelled at shutdown)."""


class StaticWorkers(Workers):
    def __init__(self, addresses: list[str], channels: Channels) -> None:
        if not addresses:
            raise ValueError("no transcriber addresses")
        self.addresses = addresses
        self.candidates = len(addresses)
        self._channels = channels
        self._next = itertools.cycle(addresses)

    async def claim(self, model: str, avoid: frozenset[str] = frozenset()) -> Lease:
        for _ in self.addresses:
            address = next(self._next)
            if address not in avoid:
                return Lease(address)
        return Lease(next(self._next))

    async def release(self, lease: Lease) -> None:
        pass

    async def maintain(self) -> None:
        pass  # nothing to keep up: the addresses are fixed

    async def readiness(self) -> Readiness:
        infos = await asyncio.gather(*(self._info(address) for address in self.addresses))
        free = sum(1 for info in infos if info and not info.draining and info.streams_open < info.max_streams)
        return Readiness(ready=free > 0, detail=f"{free} of {len(infos)} transcribers have room")

    async def _info(self, address: str) -> transcriber_pb2.WorkerInfo | None:
        stub = transcriber_pb2_grpc.TranscriberStub(self._channels.get(address))
        try:
            info: transcriber_pb2.WorkerInfo = await stub.GetWorkerInfo(
                transcriber_pb2.GetWorkerInfoRequest(), timeout=READINESS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return None
        return info


class BalancedWorkers(Workers):
    # Redis's count can lag (a worker restarted, a gateway crashed), so a stream told "full" by
    # a worker claims again a few times before answering 503.
    candidates = 3

    def __init__(self, balancer: LoadBalancer) -> None:
        self._balancer = balancer
        self._open: set[Claim] = set()

    async def claim(self, model: str, avoid: frozenset[str] = frozenset()) -> Lease:
        try:
            claim = await asyncio.to_thread(self._balancer.claim, model, avoid)
            if claim is None and avoid:  # only failed workers have room: try them again
                claim = await asyncio.to_thread(self._balancer.claim, model)
            if claim is not None:
                self._open.add(claim)
                return Lease(claim.address, claim)
            workers = await asyncio.to_thread(self._balancer.workers)
        except BalancerUnavailable as err:
            raise NoWorker("load balancer unreachable") from err
        served = sorted({name for worker in workers for name in worker.models})
        if workers and model not in served:
            raise UnknownModel(f"model {model!r} is not served (served: {', '.join(served)})")
        raise NoWorker(f"no transcriber has room for model {model!r}")

    async def release(self, lease: Lease) -> None:
        if lease.claim is not None:
            self._open.discard(lease.claim)
            await asyncio.to_thread(self._balancer.release, lease.claim)

    async def readiness(self) -> Readiness:
        try:
            workers = await asyncio.to_thread(self._balancer.workers)
        except BalancerUnavailable as err:
            return Readiness(ready=False, detail=str(err))
        return Readiness(ready=True, detail=f"load balancer reachable; {len(workers)} live workers")

    async def maintain(self) -> None:
        """Renew open streams' leases three times per lease, so a crashed gateway's claims lapse
        but a live one's never do; a Redis outage is logged by the balancer and streams go on."""
        while True:
            await asyncio.sleep(self._balancer.lease_s / 3)
            if self._open:
                renewed = await asyncio.to_thread(self._balancer.renew, list(self._open))
                log_event(log, "leases_renewed", logging.DEBUG, claims=len(self._open), renewed=renewed)
