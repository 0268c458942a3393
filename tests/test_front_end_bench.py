"""bench/front_end.py: a short run measures both front ends on both levels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from front_end import main


def test_a_short_run_writes_every_case(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(main)
    out = tmp_path / "front_end.json"
    result = CliRunner().invoke(app, ["--streams", "2", "--repeats", "1", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    timings = json.loads(out.read_text())["seconds_per_stream_frame"]
    assert set(timings) == {"as is", "auto gain"}
    for by_level in timings.values():
        assert set(by_level) == {"normal", "quiet (-30 dB)"}
        assert all(0 < seconds < 0.06 for seconds in by_level.values())  # a frame is due every 60 ms
