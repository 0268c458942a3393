"""`gharial up`: the whole stack as separate processes on loopback, used through the websocket API."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gharial.stack import LocalStack

from .service_process import BIN

EXAMPLE = Path(__file__).resolve().parents[1] / "clients" / "examples" / "cathy-arctic-b0460.flac"


def test_up_serves_the_example_through_the_gateway_and_stops_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "not-yet" / "made"  # up() makes it
    stack = LocalStack(cards=2, backend="accelerator", gateway_port=0, workdir=workdir)
    stack.up()
    try:
        names = [name for name, _ in stack.summary()]
        cards = ["emulator-0", "transcriber-0", "emulator-1", "transcriber-1"]
        assert names == ["redis", "license", "compiler", *cards, "gateway"]
        assert (workdir / "licences" / "card-1.lic").exists() and (workdir / "model.prog").exists()
        host, port = stack.gateway_address
        done = subprocess.run(
            [
                str(BIN / "gharial"),
                "client",
                str(EXAMPLE),
                "--host",
                host,
                "--port",
                str(port),
                "--no-realtime",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "no transcript came back"
        processes = [s.process for s in stack.services]
    finally:
        stack.down()
    assert [p.returncode for p in processes] == [0] * len(processes)  # every service drained and exited 0
    assert stack.redis is not None and stack.redis.poll() is not None
