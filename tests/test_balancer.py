"""The Redis load balancer against a real redis-server that each test owns (tests/redis_server.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import ValidationError

from gharial.balancer import BalancerUnavailable, Claim, LoadBalancer, WorkerRecord, WorkerRegistration
from tests.redis_server import RedisServer

Register = Callable[..., WorkerRegistration]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def register(redis_server: RedisServer) -> Iterator[Register]:
    """Start worker registrations (stopped at the end): ``register("card-0", capacity=2)``."""
    started: list[WorkerRegistration] = []

    def start(
        worker_id: str,
        capacity: int = 4,
        models: tuple[str, ...] = ("en", "de"),
        ttl_s: float = 5.0,
        heartbeat_s: float = 1.0,
    ) -> WorkerRegistration:
        record = WorkerRecord(
            worker_id=worker_id, address=f"{worker_id}:50051", models=list(models), capacity=capacity
        )
        registration = WorkerRegistration(redis_server.url, record, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
        registration.start()
        started.append(registration)
        return registration

    yield start
    for registration in started:
        registration.stop()


@pytest.fixture
def balancer(redis_server: RedisServer) -> Iterator[LoadBalancer]:
    lb = LoadBalancer(redis_server.url)
    yield lb
    lb.close()


def claimed(balancer: LoadBalancer, model: str = "en") -> Claim:
    claim = balancer.claim(model)
    assert claim is not None, f"no capacity for {model}"
    return claim


def claims_metric(model: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("gharial_balancer_claims_total", {"model": model, "outcome": outcome})
    return value or 0.0


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_claims_go_to_the_least_loaded_worker(register: Register, balancer: LoadBalancer) -> None:
    register("card-0", capacity=4)
    register("card-1", capacity=4)
    before = claims_metric("en", "ok")
    chosen = [claimed(balancer) for _ in range(6)]
    assert [c.worker_id for c in chosen] == ["card-0", "card-1"] * 3  # ties: lowest ID
    assert (chosen[1].address, chosen[1].model) == ("card-1:50051", "en")
    assert claims_metric("en", "ok") - before == 6
    released_before = REGISTRY.get_sample_value("gharial_balancer_releases_total") or 0.0
    balancer.release(chosen[0])  # card-0 now has the fewest claims
    assert REGISTRY.get_sample_value("gharial_balancer_releases_total") == released_before + 1
    assert claimed(balancer).worker_id == "card-0"
    assert balancer.claim_count("card-0") == 3 and balancer.claim_count("card-1") == 3


def test_claims_pass_over_workers_that_failed_the_stream(register: Register, balancer: LoadBalancer) -> None:
    register("card-0")
    register("card-1")
    # card-0 is the least loaded, but the stream just failed there (a dead card behind it)
    moved = balancer.claim("en", avoid=["card-0:50051"])
    assert moved is not None and moved.worker_id == "card-1"
    assert balancer.claim("en", avoid=["card-0:50051", "card-1:50051"]) is None


def test_only_workers_serving_the_model_are_chosen(register: Register, balancer: LoadBalancer) -> None:
    register("card-0", models=("en",))
    register("card-1", models=("de", "fr"))
    assert {claimed(balancer, "de").worker_id for _ in range(3)} == {"card-1"}
    assert {claimed(balancer, "en").worker_id for _ in range(3)} == {"card-0"}
    before = claims_metric("es", "no_capacity")
    assert balancer.claim("es") is None
    assert claims_metric("es", "no_capacity") - before == 1
    assert [w.worker_id for w in balancer.workers("fr")] == ["card-1"]
    assert [(w.worker_id, w.claims) for w in balancer.workers()] == [("card-0", 3), ("card-1", 3)]


def test_full_workers_give_none_until_a_slot_is_released(register: Register, balancer: LoadBalancer) -> None:
    register("card-0", capacity=2)
    register("card-1", capacity=1)
    claims = [claimed(balancer) for _ in range(3)]
    assert balancer.claim("en") is None
    balancer.release(claims[2])
    assert claimed(balancer).worker_id == claims[2].worker_id
    assert balancer.claim("en") is None


def test_draining_worker_keeps_claims_gets_no_new_ones(register: Register, balancer: LoadBalancer) -> None:
    card0 = register("card-0")
    register("card-1")
    assert claimed(balancer).worker_id == "card-0"
    card0.set_draining(True)
    assert [claimed(balancer).worker_id for _ in range(4)] == ["card-1"] * 4
    assert balancer.claim("en") is None  # card-1 is full; card-0 has room but drains
    assert balancer.claim_count("card-0") == 1
    assert [(w.worker_id, w.draining, w.claims) for w in balancer.workers()] == [
        ("card-0", True, 1),
        ("card-1", False, 4),
    ]
    card0.set_draining(False)
    assert claimed(balancer).worker_id == "card-0"


def test_worker_whose_heartbeat_stops_vanishes_within_its_ttl(
    redis_server: RedisServer, register: Register, balancer: LoadBalancer
) -> None:
    register("card-1", ttl_s=1.0, heartbeat_s=0.2)
    record = WorkerRecord(worker_id="card-0", address="card-0:50051", models=["en"], capacity=4)
    assert WorkerRegistration(redis_server.url, record, ttl_s=1.0, heartbeat_s=0.2).beat()  # then "crashes"
    assert [w.worker_id for w in balancer.workers()] == ["card-0", "card-1"]
    assert wait_for(lambda: [w.worker_id for w in balancer.workers()] == ["card-1"], timeout=2.0) < 1.2
    assert {claimed(balancer).worker_id for _ in range(4)} == {"card-1"}
    time.sleep(0.5)  # the live worker's heartbeat keeps it registered past its TTL
    assert [w.worker_id for w in balancer.workers()] == ["card-1"]


def test_stop_deregisters(register: Register, balancer: LoadBalancer) -> None:
    card0 = register("card-0")
    claimed(balancer)
    card0.stop()
    assert balancer.workers() == []
    assert balancer.claim_count("card-0") == 0


def test_expired_leases_are_reclaimed(register: Register, redis_server: RedisServer) -> None:
    register("card-0", capacity=2)
    balancer = LoadBalancer(redis_server.url, lease_s=0.4)
    kept, lapsing = claimed(balancer), claimed(balancer)
    assert balancer.claim("en") is None
    for _ in range(4):  # 0.6 s: past the first lease, renewed every 0.15 s
        time.sleep(0.15)
        assert balancer.renew([kept]) == 1
    assert balancer.claim_count("card-0") == 1
    assert balancer.renew([lapsing]) == 0  # a lapsed lease is not brought back
    third = claimed(balancer)
    balancer.release(third)
    assert balancer.renew([kept, third]) == 1  # nor is a released one
    assert balancer.claim_count("card-0") == 1
    balancer.close()


def test_concurrent_claims_never_exceed_capacity(register: Register, redis_server: RedisServer) -> None:
    """Many gateways claiming at once: with a read-then-write claim, they would overbook."""
    capacities = {"card-0": 3, "card-1": 2, "card-2": 1}
    for worker_id, capacity in capacities.items():
        register(worker_id, capacity=capacity)
    threads, start = 24, threading.Barrier(24)
    won: list[Claim] = []
    lock = threading.Lock()

    def gateway() -> None:
        lb = LoadBalancer(redis_server.url)
        start.wait()
        while (claim := lb.claim("en")) is not None:
            with lock:
                won.append(claim)
        lb.close()

    workers = [threading.Thread(target=gateway) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert Counter(c.worker_id for c in won) == capacities
    assert len({c.claim_id for c in won}) == len(won)


def test_redis_outage_and_restart(
    redis_server: RedisServer, register: Register, balancer: LoadBalancer
) -> None:
    registration = register("card-0", ttl_s=1.0, heartbeat_s=0.2)
    claim = claimed(balancer)
    redis_server.stop()

    started = time.monotonic()
    errors_before = claims_metric("en", "redis_error")
    with pytest.raises(BalancerUnavailable):
        balancer.claim("en")
    assert time.monotonic() - started < 1.0
    assert claims_metric("en", "redis_error") - errors_before == 1
    balancer.release(claim)  # logged, not raised: the stream carries on
    assert balancer.renew([claim]) == 0
    with pytest.raises(BalancerUnavailable):
        balancer.workers()
    failed = {"worker_id": "card-0", "outcome": "redis_error"}
    wait_for(lambda: (REGISTRY.get_sample_value("gharial_balancer_heartbeats_total", failed) or 0) > 0, 2.0)
    assert registration.beat() is False

    redis_server.restart()  # empty: the registration must come back by itself
    # within one heartbeat (0.2 s), plus slack for a busy machine
    assert wait_for(lambda: [w.worker_id for w in balancer.workers()] == ["card-0"], timeout=2.0) < 0.8
    assert claimed(balancer).worker_id == "card-0"


def test_registration_started_while_redis_is_down_appears_when_it_is_up(
    redis_server: RedisServer, register: Register, balancer: LoadBalancer
) -> None:
    redis_server.stop()
    register("card-0", heartbeat_s=0.2)  # neither raises nor blocks for long
    redis_server.start()
    wait_for(lambda: len(balancer.workers()) == 1, timeout=1.0)


def test_keys_live_under_the_prefix(redis_server: RedisServer) -> None:
    record = WorkerRecord(worker_id="card-0", address="a:1", models=["en"], capacity=1)
    registration = WorkerRegistration(redis_server.url, record, prefix="test:")
    registration.start()
    balancer = LoadBalancer(redis_server.url, prefix="test:")
    claimed(balancer)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert sorted(client.keys()) == ["test:claims:card-0", "test:worker:card-0", "test:workers"]
    assert LoadBalancer(redis_server.url).workers() == []  # another prefix, another registry
    registration.stop()
    assert client.keys() == []


def test_worker_ids_must_be_safe_in_key_names() -> None:
    with pytest.raises(ValidationError):
        WorkerRecord(worker_id="card 0", address="a:1", models=["en"], capacity=1)


CAPACITIES = {"card-0": ("en", 2), "card-1": ("en", 3), "card-2": ("de", 1), "card-3": ("en", 1)}
operations = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.sampled_from(["en", "de", "fr"])),
        st.tuples(st.just("release"), st.integers(0, 10)),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_claims_and_releases_match_a_simple_model(
    redis_server: RedisServer, ops: list[tuple[str, str | int]]
) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    for worker_id, (model, capacity) in CAPACITIES.items():
        record = WorkerRecord(worker_id=worker_id, address="a:1", models=[model], capacity=capacity)
        assert WorkerRegistration(redis_server.url, record, ttl_s=60).beat()
    balancer = LoadBalancer(redis_server.url)
    held: list[Claim] = []
    expected = dict.fromkeys(CAPACITIES, 0)
    for op, arg in ops:
        if op == "claim":
            free = [w for w, (m, cap) in CAPACITIES.items() if m == arg and expected[w] < cap]
            claim = balancer.claim(str(arg))
            if not free:
                assert claim is None
                continue
            assert claim is not None
            assert claim.worker_id == min(free, key=lambda w: (expected[w], w))
            expected[claim.worker_id] += 1
            held.append(claim)
        elif held:
            released = held.pop(int(arg) % len(held))
            balancer.release(released)
            expected[released.worker_id] -= 1
    assert {w.worker_id: w.claims for w in balancer.workers()} == expected
    balancer.close()
