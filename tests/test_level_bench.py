"""bench/level_robustness.py: the level change it applies, and a run on the shipped real utterance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from click.testing import Result
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from level_robustness import SAMPLE_RATE, at_level, main, session_of

from tests.conftest import SHIPPED_TAKE

ASSETS = Path(__file__).resolve().parent / "assets"


def run_bench(*args: str) -> Result:
    """The benchmark's command line, run in-process on the shipped utterance's manifest."""
    app = typer.Typer()
    app.command()(main)
    return CliRunner().invoke(app, ["--speech-dev", str(ASSETS / "manifest.json"), *args])


def test_at_level_scales_the_audio_and_keeps_it_16_bit() -> None:
    original = SHIPPED_TAKE.load_audio(SAMPLE_RATE).numpy()
    same, level = at_level(SHIPPED_TAKE, 0.0)
    quieter, quieter_level = at_level(SHIPPED_TAKE, -20.0)
    assert abs((level - quieter_level) - 20.0) < 0.05
    scaled = quieter.load_audio(SAMPLE_RATE).numpy()  # read back from the in-memory WAV
    assert np.abs(scaled - original * 0.1).max() <= 1 / 32768 + 1e-7
    assert np.abs(same.load_audio(SAMPLE_RATE).numpy() - original).max() <= 1 / 32768 + 1e-7
    loud, _ = at_level(SHIPPED_TAKE, 40.0)
    assert np.abs(loud.load_audio(SAMPLE_RATE).numpy()).max() <= 1.0


def test_a_run_reports_every_offset_with_and_without_auto_gain(tmp_path: Path) -> None:
    out = tmp_path / "levels.json"
    result = run_bench("--offset-db", "0", "--offset-db", "-30", "--json-out", str(out))
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert set(document["results"]) == {"bundled", "bundled + auto gain"}
    seen = document["results"]["bundled"]["speech-dev seen"]  # the asset is the seen speaker's
    lifted = document["results"]["bundled + auto gain"]["speech-dev seen"]
    assert set(seen) == set(lifted) == {"0.0", "-30.0"}
    assert seen["0.0"]["words"] == seen["-30.0"]["words"] == 11
    assert seen["0.0"]["wer"] == lifted["0.0"]["wer"] == 0.0  # the model gets this training take right
    assert seen["-30.0"]["wer"] == 1.0  # 30 dB quieter the model hears nothing
    assert lifted["-30.0"]["wer"] == 0.0  # automatic gain gives it back
    levels = document["median_rms_dbfs"]["speech-dev seen"]
    assert abs(levels["0.0"] - levels["-30.0"] - 30.0) < 0.1
    assert set(document["results"]["bundled"]) == {"speech-dev seen"}  # no unseen utterances given


def test_a_session_joins_utterances_into_one_stream(tmp_path: Path) -> None:
    session = session_of([SHIPPED_TAKE, SHIPPED_TAKE])
    assert session.transcript == f"{SHIPPED_TAKE.transcript} {SHIPPED_TAKE.transcript}"
    audio, one = session.load_audio(SAMPLE_RATE), SHIPPED_TAKE.load_audio(SAMPLE_RATE)
    assert torch.equal(audio, torch.cat([one, one]))
    assert session.duration == pytest.approx(2 * SHIPPED_TAKE.duration, abs=1e-3)


def test_a_corrupt_checkpoint_is_named_before_anything_is_decoded(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.hwckpt"
    corrupt.write_bytes(b"not a checkpoint")
    result = run_bench("--checkpoint", str(corrupt), "--json-out", str(tmp_path / "out.json"))
    assert result.exit_code == 2
    flat = "".join(c for c in result.output if c.isalnum() or c in "._")  # rich may fold a long path
    assert "corrupt.hwckpt" in flat and "bundled" not in flat
    assert not (tmp_path / "out.json").exists()
