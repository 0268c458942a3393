"""Load balancing across card workers through Redis (DESIGN.md §6).

Each transcriber registers its card worker with a `WorkerRegistration` and heartbeats it; the
gateway claims a slot on the least-loaded live worker for a stream with `LoadBalancer.claim` and
releases it when the stream ends. Nothing else shares state through Redis.

Keys (standalone Redis; `prefix` defaults to ``gharial:``):

- ``{prefix}workers`` — set of the registered worker IDs, the index the claim script walks. IDs
  whose record has expired are removed by the next claim.
- ``{prefix}worker:{worker_id}`` — the `WorkerRecord` as JSON, with a TTL of `ttl_s` that every
  heartbeat renews: a worker whose heartbeat stops vanishes when it lapses, and after a Redis
  restart (which loses every key) a worker is back within one heartbeat.
- ``{prefix}claims:{worker_id}`` — sorted set of the worker's claims: member = claim ID, score =
  lease deadline in ms of Redis server time (one clock for every gateway). Leases past their
  deadline no longer count and are dropped by the next claim; the gateway renews the leases of its
  open streams, so a crashed gateway's claims expire instead of leaking. The set's own TTL is kept
  at least as long as its newest lease, so a dead worker's set disappears too.

`claim` is one Lua script: it reads Redis's clock, drops expired leases, and picks, among live
workers that serve the model and are not draining, the one with the fewest claims and a free slot
(ties: the lowest worker ID in Redis's string order, so choices are deterministic), then records
the claim. The script touches keys it derives from the prefix, so it needs a standalone Redis, not
Redis Cluster.

Failures: Redis calls use short timeouts and one immediate retry (a pooled connection may be stale
after a Redis restart). `claim`, `workers` and `claim_count` raise `BalancerUnavailable` when Redis
cannot be reached (the gateway answers 503); `release`, `renew` and heartbeats log and carry on, so
streams in progress outlive a Redis outage. When a claim times out after the script ran (a stalled
Redis), the slot it took is never handed out, so never renewed, and lapses with its lease. After
Redis loses its data, streams still open are not counted until they end (`renew` never re-creates a
claim, so a released claim cannot come back).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from gharial.plumbing.logs import log_event

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "gharial:"

CLAIMS = Counter("gharial_balancer_claims_total", "Stream slot claims, by outcome", ["model", "outcome"])
RELEASES = Counter("gharial_balancer_releases_total", "Stream slots released")
REDIS_ERRORS = Counter("gharial_balancer_redis_errors_total", "Failed Redis calls", ["operation"])
HEARTBEATS = Counter("gharial_balancer_heartbeats_total", "Worker heartbeats", ["worker_id", "outcome"])

# Milliseconds of Redis server time, so that every gateway and worker uses the same clock.
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# ARGV: prefix, model, claim ID, lease in ms, then addresses to avoid. Returns {worker ID, address}
# or nil (no capacity).
_CLAIM = (
    _NOW
    + """
local prefix, model, claim_id, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local avoid = {}
for i = 5, #ARGV do avoid[ARGV[i]] = true end
local index = prefix .. 'workers'
local best_id, best_load, best_address
for _, id in ipairs(redis.call('SMEMBERS', index)) do
  local claims = prefix .. 'claims:' .. id
  redis.call('ZREMRANGEBYSCORE', claims, '-inf', now)
  local raw = redis.call('GET', prefix .. 'worker:' .. id)
  if not raw then
    redis.call('SREM', index, id)
  else
    local worker = cjson.decode(raw)
    local serves = false
    for _, name in ipairs(worker.models) do
      if name == model then serves = true end
    end
    if serves and not worker.draining and not avoid[worker.address] then
      local load = redis.call('ZCARD', claims)
      if load < worker.capacity
          and (best_id == nil or load < best_load or (load == best_load and id < best_id)) then
        best_id, best_load, best_address = id, load, worker.address
      end
    end
  end
end
if best_id == nil then
  return nil
end
local claims = prefix .. 'claims:' .. best_id
redis.call('ZADD', claims, now + lease_ms, claim_id)
if redis.call('PTTL', claims) < lease_ms then
  redis.call('PEXPIRE', claims, lease_ms)
end
return {best_id, best_address}
"""
)

# KEYS: the claims set of each claim; ARGV: lease in ms, then each claim's ID. Extends the leases
# that have not lapsed (never re-creates one) and returns how many it extended.
_RENEW = (
    _NOW
    + """
local lease_ms = tonumber(ARGV[1])
local renewed = 0
for i, claims in ipairs(KEYS) do
  local deadline = redis.call('ZSCORE', claims, ARGV[i + 1])
  if deadline and tonumber(deadline) > now then
    redis.call('ZADD', claims, 'XX', now + lease_ms, ARGV[i + 1])
    if redis.call('PTTL', claims) < lease_ms then
      redis.call('PEXPIRE', claims, lease_ms)
    end
    renewed = renewed + 1
  end
end
return renewed
"""
)

# ARGV: prefix. Returns {record JSON, live claims, ...} for every live worker; changes nothing.
_STATUS = (
    _NOW
    + """
local prefix = ARGV[1]
local reply = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers')) do
  local raw = redis.call('GET', prefix .. 'worker:' .. id)
  if raw then
    table.insert(reply, raw)
    table.insert(reply, redis.call('ZCOUNT', prefix .. 'claims:' .. id, '(' .. now, '+inf'))
  end
end
return reply
"""
)

# KEYS: one claims set. Returns its live claims.
_COUNT = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"


class BalancerUnavailable(Exception):
    """Redis cannot be reached, so no worker can be chosen (the gateway answers 503)."""


class WorkerRecord(BaseModel):
    """What a card worker publishes about itself (stored as JSON under ``{prefix}worker:{id}``)."""

    model_config = ConfigDict(frozen=True)

    # The ID is part of key names: keep it to characters that need no escaping.
    worker_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    address: str = Field(min_length=1, description="gRPC address of the transcriber, host:port")
    models: list[str] = Field(min_length=1, description="names of the models it serves")
    capacity: int = Field(ge=0, description="streams it can hold at once")
    draining: bool = False


class WorkerStatus(WorkerRecord):
    """A live worker's record plus its current claims (for metrics and `/readyz`)."""

    claims: int


class Claim(BaseModel):
    """A slot on one worker, held by one stream until released or its lease lapses."""

    model_config = ConfigDict(frozen=True)

    claim_id: str
    worker_id: str
    address: str
    model: str


def _connect(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast: `timeout_s` to connect and per reply, one immediate retry."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def _worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}worker:{worker_id}"


def _claims_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}claims:{worker_id}"


class WorkerRegistration:
    """A transcriber's registration of its card worker, kept alive by a heartbeat thread."""

    def __init__(
        self,
        redis_url: str,
        record: WorkerRecord,
        ttl_s: float = 5.0,
        heartbeat_s: float = 1.0,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 0.5,
    ) -> None:
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be positive and below ttl_s ({ttl_s})")
        self._redis = _connect(redis_url, timeout_s)
        self._record = record
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.prefix = prefix
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def record(self) -> WorkerRecord:
        return self._record

    def start(self) -> None:
        """Register now and keep heartbeating; works even while Redis is down (it retries)."""
        if self._thread is not None:
            raise RuntimeError("registration already started")
        self.beat()
        log_event(log, "worker_registered", **self._record.model_dump())
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"heartbeat-{self._record.worker_id}", daemon=True
        )
        self._thread.start()

    def set_draining(self, draining: bool = True) -> None:
        """Take no new streams (SIGTERM) while open ones finish; published at once."""
        with self._lock:
            self._record = self._record.model_copy(update={"draining": draining})
        log_event(log, "worker_draining", worker_id=self._record.worker_id, draining=draining)
        self.beat()

    def beat(self) -> bool:
        """Write the record with a fresh TTL; False (logged, counted) when Redis is unreachable."""
        with self._lock:  # one write at a time, so a stale record never lands last
            worker_id, record = self._record.worker_id, self._record.model_dump_json()
            try:
                with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(_worker_key(self.prefix, worker_id), record, px=self._ttl_ms)
                    pipe.sadd(f"{self.prefix}workers", worker_id)
                    pipe.execute()
            except redis.RedisError as error:
                HEARTBEATS.labels(worker_id=worker_id, outcome="redis_error").inc()
                REDIS_ERRORS.labels(operation="heartbeat").inc()
                if not self._failing:  # one line per outage, not one per beat
                    log_event(log, "heartbeat_failed", logging.WARNING, worker_id=worker_id, error=str(error))
                self._failing = True
                return False
            HEARTBEATS.labels(worker_id=worker_id, outcome="ok").inc()
            if self._failing:
                log_event(log, "heartbeat_recovered", worker_id=worker_id)
            self._failing = False
            return True

    def stop(self) -> None:
        """Stop heartbeating and delete the worker's keys (call once its streams have ended)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        worker_id = self._record.worker_id
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(_worker_key(self.prefix, worker_id), _claims_key(self.prefix, worker_id))
                pipe.srem(f"{self.prefix}workers", worker_id)
                pipe.execute()
        except redis.RedisError as error:  # the record lapses with its TTL anyway
            REDIS_ERRORS.labels(operation="deregister").inc()
            log_event(log, "worker_deregister_failed", logging.WARNING, worker_id=worker_id, error=str(error))
        else:
            log_event(log, "worker_deregistered", worker_id=worker_id)
        self._redis.close()

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def _heartbeat(self) -> None:
        while not self._stopping.wait(self.heartbeat_s):
            self.beat()


class LoadBalancer:
    """The gateway's side: claim a slot for a new stream, release it when the stream ends.

    Thread-safe (the Redis client keeps a connection pool); calls block for at most about twice
    `timeout_s`, so call them from a thread pool in async code.
    """

    def __init__(
        self, redis_url: str, lease_s: float = 30.0, prefix: str = DEFAULT_PREFIX, timeout_s: float = 0.5
    ) -> None:
        """Renew open streams' claims well within `lease_s` (e.g. every `lease_s / 3`)."""
        self._redis = _connect(redis_url, timeout_s)
        self.lease_s = lease_s
        self.prefix = prefix
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._status = self._redis.register_script(_STATUS)
        self._count = self._redis.register_script(_COUNT)

    def claim(self, model: str, avoid: Iterable[str] = ()) -> Claim | None:
        """A slot on the least-loaded live worker serving `model`, or None when all are full.
        Workers at the addresses in `avoid` (ones that just failed this stream) are passed over."""
        claim_id = uuid.uuid4().hex
        try:
            reply = self._claim(args=[self.prefix, model, claim_id, self._lease_ms, *avoid])
        except redis.RedisError as error:
            CLAIMS.labels(model=model, outcome="redis_error").inc()
            self._failed("claim", error)
            raise BalancerUnavailable(f"Redis unreachable: {error}") from error
        if reply is None:
            CLAIMS.labels(model=model, outcome="no_capacity").inc()
            log_event(log, "balancer_no_capacity", model=model)
            return None
        worker_id, address = reply
        CLAIMS.labels(model=model, outcome="ok").inc()
        log_event(log, "balancer_claimed", logging.DEBUG, model=model, worker_id=worker_id, claim_id=claim_id)
        return Claim(claim_id=claim_id, worker_id=worker_id, address=address, model=model)

    def release(self, claim: Claim) -> None:
        """Free the claim's slot; a Redis failure is logged and its lease lapses instead."""
        try:
            self._redis.zrem(_claims_key(self.prefix, claim.worker_id), claim.claim_id)
        except redis.RedisError as error:
            self._failed("release", error)
            return
        RELEASES.inc()
        log_event(log, "balancer_released", logging.DEBUG, worker_id=claim.worker_id, claim_id=claim.claim_id)

    def renew(self, claims: Iterable[Claim]) -> int:
        """Extend the leases of open streams' claims; returns how many still existed (0 on a Redis
        failure, which is logged: the streams carry on)."""
        claims = list(claims)
        if not claims:
            return 0
        keys = [_claims_key(self.prefix, claim.worker_id) for claim in claims]
        try:
            renewed = int(self._renew(keys=keys, args=[self._lease_ms, *(c.claim_id for c in claims)]))
        except redis.RedisError as error:
            self._failed("renew", error)
            return 0
        if renewed < len(claims):
            log_event(log, "balancer_claims_lost", logging.WARNING, claims=len(claims), renewed=renewed)
        return renewed

    def workers(self, model: str | None = None) -> list[WorkerStatus]:
        """Live workers (serving `model`, if given) with their live claims, sorted by worker ID."""
        try:
            reply: list[Any] = self._status(args=[self.prefix])
        except redis.RedisError as error:
            self._failed("workers", error)
            raise BalancerUnavailable(f"Redis unreachable: {error}") from error
        statuses = [
            WorkerStatus.model_validate({**json.loads(raw), "claims": count})
            for raw, count in zip(reply[::2], reply[1::2], strict=True)
        ]
        return sorted((s for s in statuses if model is None or model in s.models), key=lambda s: s.worker_id)

    def claim_count(self, worker_id: str) -> int:
        """Live claims on one worker."""
        try:
            return int(self._count(keys=[_claims_key(self.prefix, worker_id)]))
        except redis.RedisError as error:
            self._failed("claim_count", error)
            raise BalancerUnavailable(f"Redis unreachable: {error}") from error

    def close(self) -> None:
        self._redis.close()

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def _failed(self, operation: str, error: redis.RedisError) -> None:
        REDIS_ERRORS.labels(operation=operation).inc()
        log_event(log, "balancer_redis_error", logging.WARNING, operation=operation, error=str(error))
