"""bench/rnnt_loss.py: a short run times the whole-lattice and the pruned loss on a real batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from rnnt_loss import MANIFESTS, main


@pytest.mark.skipif(not MANIFESTS[0].exists(), reason="needs ../shared/data/train-cathy")
def test_a_short_run_times_every_loss(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(main)
    out = tmp_path / "rnnt_loss.json"
    args = ["--batches", "1", "--repeats", "1", "--prune-range", "4", "--json-out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {row["loss"]: row for row in report["rows"]}
    assert set(rows) == {"whole lattice", "pruned, 4 tokens a frame"}
    assert rows["whole lattice"]["speed_up"] == 1.0
    whole, pruned = rows["whole lattice"], rows["pruned, 4 tokens a frame"]
    # one batch: the whole lattice's logits hold U + 1 token positions a frame, the pruned ones at most 4
    positions = report["most_tokens"] + 1
    expected = whole["largest_tensor_mb"] * min(4, positions) / positions
    assert pruned["largest_tensor_mb"] == pytest.approx(expected)
    assert pruned["largest_tensor_mb"] > 0
    assert all(row["ms_per_batch"] > 0 for row in rows.values())
