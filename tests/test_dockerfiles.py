"""deploy/docker: one Dockerfile per service. No Docker engine runs here, so they are checked as
text: every COPY source exists, every entry point is a real console script, the base image is
pinned, and the runtime stage runs as a non-root user."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
SERVICES = ["gateway", "transcriber", "emulator", "compiler", "license"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_every_service_has_a_dockerfile() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{s}.Dockerfile" for s in SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_is_buildable_as_written(service: str) -> None:
    steps = instructions(DOCKER / f"{service}.Dockerfile")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: build, then a runtime image"
    for image in stages:
        name = image.split()[0]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", name), f"base image {name} is not pinned to a version"
    for keyword, args in steps:
        if keyword == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    (entrypoint,) = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    command = entrypoint.strip('[]"').split('"')[0]
    assert command == f"gharial-{service}" and command in scripts, f"{command} is not a console script"
    runtime = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the runtime stage must not run as root"
