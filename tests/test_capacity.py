"""The capacity study against CAIMAN-ASR's numbers (issue 5), with the one bundled card profile.

The simulations are seeded, so these are deterministic. They check the acceptance bands at their
edges (a stream count keeps up below the band and not above it) rather than bisecting, and simulate
a few seconds per point to stay fast; bench/emulator_fidelity.py runs the full bisection.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gharial.accelerator.capacity import LOW_LOAD_STREAMS, max_rts, simulate
from gharial.accelerator.layout import lower
from gharial.accelerator.profile import load_profile
from gharial.accelerator.timing import TimingModel
from gharial.asr.config import load_model_config
from gharial.cli.main import app

SECONDS = 3.0
TARGETS = {"base": 2000, "large": 800}  # greedy real-time streams per card at p99 <= 25 ms


@pytest.fixture(scope="module")
def models() -> dict[str, TimingModel]:
    card = load_profile()
    return {name: TimingModel(card, lower(load_model_config(name))) for name in TARGETS}


@pytest.mark.parametrize("name", list(TARGETS))
def test_max_rts_within_ten_percent_of_caiman(models: dict[str, TimingModel], name: str) -> None:
    target = TARGETS[name]
    assert simulate(models[name], round(0.9 * target), seconds=SECONDS).keeps_up
    too_many = simulate(models[name], round(1.1 * target), seconds=SECONDS)
    assert not too_many.keeps_up and too_many.p99_ms > 25


@pytest.mark.parametrize("name", list(TARGETS))
def test_p99_at_32_streams_is_15_ms(models: dict[str, TimingModel], name: str) -> None:
    point = simulate(models[name], LOW_LOAD_STREAMS, seconds=SECONDS)
    assert point.p99_ms == pytest.approx(15.0, abs=3.0)
    assert point.p50_ms < point.p99_ms <= point.max_ms


def test_bisection_finds_the_knee(models: dict[str, TimingModel]) -> None:
    best = max_rts(models["base"], seconds=2.0, resolution=0.02)
    assert best is not None and best.keeps_up and best.p99_ms > 22
    assert best.streams == pytest.approx(TARGETS["base"], rel=0.1)
    assert best.utilisation > 0.95 and best.mean_batch > 100


def test_eight_cards_scale_linearly_past_15000_streams(models: dict[str, TimingModel]) -> None:
    base = models["base"]
    assert simulate(base, 15_000, cards=8, seconds=SECONDS).keeps_up
    assert not simulate(base, 8 * round(1.1 * TARGETS["base"]), cards=8, seconds=SECONDS).keeps_up


def test_overload_builds_a_backlog(models: dict[str, TimingModel]) -> None:
    point = simulate(models["large"], 2000, seconds=1.0)
    assert point.backlog > 0 and not point.keeps_up


def test_same_seed_same_result_and_beam_costs_capacity(models: dict[str, TimingModel]) -> None:
    base = models["base"]
    assert simulate(base, 500, seconds=1.0, seed=7) == simulate(base, 500, seconds=1.0, seed=7)
    assert simulate(base, 1800, seconds=SECONDS).keeps_up
    assert not simulate(base, 1800, seconds=SECONDS, beam=4).keeps_up


def test_cli_json_schema() -> None:
    args = ["emulate", "capacity", "--model", "testing", "--cards", "2", "--seconds", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["model", "cards", "max_rts", "p99_ms_at_max", "p99_ms_at_32", "sweep"]
    assert out["model"] == "testing" and out["cards"] == 2 and out["max_rts"] > 1000
    assert out["p99_ms_at_max"] <= 25 and out["p99_ms_at_32"] < out["p99_ms_at_max"]
    streams = [p["streams"] for p in out["sweep"]]
    assert streams == sorted(streams) and LOW_LOAD_STREAMS in streams and out["max_rts"] in streams
    for point in out["sweep"]:
        assert set(point) == {
            "streams",
            "cards",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "mean_batch",
            "utilisation",
            "backlog",
            "keeps_up",
        }
        assert point["keeps_up"] == (point["streams"] <= out["max_rts"])


def test_cli_rejects_unknown_model_and_profile() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["emulate", "capacity", "--model", "nope"]).exit_code == 2
    assert runner.invoke(app, ["emulate", "capacity", "--profile", "nope"]).exit_code == 2
