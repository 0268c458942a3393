"""`gharial perf` and `gharial live` against a real local stack (cpu backend, one worker)."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gharial.cli.main import app
from gharial.clients.perf import PerfReport
from gharial.stack import LocalStack
from tests.conftest import SPEECH_DEV

GHARIAL = str(Path(sys.executable).parent / "gharial")


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[int]:
    stack = LocalStack(cards=1, backend="cpu", gateway_port=0)
    stack.up()
    try:
        yield stack.gateway_address[1]
    finally:
        stack.down()


def test_perf_json_report(gateway_port: int, speech_dev_manifest: list[dict[str, Any]]) -> None:
    files = [SPEECH_DEV / str(entry["files"][0]["fname"]) for entry in speech_dev_manifest[:2]]
    run = subprocess.run(
        [GHARIAL, "perf", *map(str, files), "--concurrent-connections", "4", "--port", str(gateway_port),
         "--json", "--duration", "20", "--max-latency", "60"],  # no wall-clock threshold in a test
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = PerfReport.model_validate(json.loads(run.stdout))
    assert report.connections == 4 and report.errors == 0 and report.error_reasons == {}
    assert report.dropped_responses == 0
    assert report.frames_sent > 0 and report.latency.count == report.frames_sent
    assert report.utterances_completed == 4 and report.streams_held == 4
    assert report.loop_lag.count > 0
    assert [t.connection for t in report.transcripts] == [0, 1, 2, 3]
    for t in report.transcripts:
        assert Path(t.file) == files[t.connection % 2]
    for path in files:
        client = subprocess.run(
            [GHARIAL, "client", str(path), "--no-realtime", "--port", str(gateway_port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        expected = client.stdout.strip()
        assert [t.transcript for t in report.transcripts if Path(t.file) == path] == [expected, expected]


def test_perf_reports_connect_errors(speech_dev_manifest: list[dict[str, Any]]) -> None:
    path = SPEECH_DEV / str(speech_dev_manifest[0]["files"][0]["fname"])
    result = CliRunner().invoke(app, ["perf", str(path), "--port", "1", "--connect-timeout", "2", "--json"])
    assert result.exit_code == 1
    report = PerfReport.model_validate_json(result.stdout)
    assert report.errors == 1 and report.streams_held == 0 and report.frames_sent == 0


def test_live_lists_devices() -> None:
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as error:  # not installed, or no PortAudio library
        pytest.skip(f"sounddevice unusable: {error}")
    result = CliRunner().invoke(app, ["live", "--list-devices"])
    assert result.exit_code == 0, result.output


def test_live_without_sounddevice(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_sounddevice(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sounddevice":
            raise ImportError("No module named 'sounddevice'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sounddevice)
    result = CliRunner().invoke(app, ["live", "--list-devices"])
    assert result.exit_code == 2
    assert "pip install 'gharial[live]'" in result.output
