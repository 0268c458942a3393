"""bench/soak.py: a two-window soak of the cpu stack, and the growth verdict on made-up windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serving import EXAMPLE_AUDIO
from soak import soak, verdict

from gharial.clients.perf import Audio


def test_a_short_soak_records_every_window_and_drops_nothing() -> None:
    document = json.loads(json.dumps(soak("cpu", [Audio.load(EXAMPLE_AUDIO)], 2, 2, 5.0, 2.0)))
    assert set(document) == {"config", "machine", "windows", "verdict"}
    assert document["config"]["streams"] == 2
    rows = document["windows"]
    assert [r["window"] for r in rows] == [1, 2]
    for row in rows:
        assert row["expected_responses"] > 0
        assert row["received_responses"] == row["expected_responses"]
        assert row["dropped_responses"] == 0 and row["errors"] == 0
        assert set(row["rss_mib"]) == set(row["fds"]) == {"transcriber-0", "gateway"}
        assert all(v > 0 for v in row["rss_mib"].values()) and all(n > 0 for n in row["fds"].values())
        assert row["redis_used_mib"] > 0
    result = document["verdict"]
    assert result["dropped_responses"] == 0 and result["errors"] == 0
    assert set(result["growth_mib_per_min"]) == {"transcriber-0", "gateway", "redis"}


def window(index: int, minutes: float, gateway_mib: float, dropped: int = 0) -> dict[str, Any]:
    return {
        "window": index,
        "elapsed_s": 60 * minutes,
        "dropped_responses": dropped,
        "errors": 0,
        "streams_behind_real_time": 0,
        "rss_mib": {"gateway": gateway_mib, "transcriber-0": 500.0},
        "fds": {"gateway": 20, "transcriber-0": 30},
        "redis_used_mib": 1.0,
        "redis_keys": 3,
    }


def test_verdict_measures_growth_from_the_window_after_warm_up() -> None:
    # window 1 grows 100 MiB (warm-up, ignored); then the gateway grows 3 MiB a minute
    rows = [window(1, 1, 100.0), window(2, 2, 200.0), window(3, 3, 203.0), window(4, 4, 206.0)]
    result = verdict(rows, max_growth_mib_per_min=2.0)
    assert result["baseline_window"] == 2 and result["last_window"] == 4
    assert result["growth_mib_per_min"] == {"gateway": 3.0, "transcriber-0": 0.0, "redis": 0.0}
    assert not result["passed"] and result["reasons"] == ["gateway grows +3.00 MiB/min"]
    assert verdict(rows, max_growth_mib_per_min=4.0)["passed"]


def test_verdict_fails_on_dropped_responses() -> None:
    rows = [window(1, 1, 100.0), window(2, 2, 100.0, dropped=2), window(3, 3, 100.0)]
    result = verdict(rows, max_growth_mib_per_min=2.0)
    assert not result["passed"] and result["reasons"] == ["2 responses dropped"]
