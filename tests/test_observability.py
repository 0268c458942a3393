"""deploy/prometheus and deploy/grafana (DESIGN §7): promtool accepts the config and rules and passes
their unit tests, and every metric the rules and the dashboard use is one the real services export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gharial.stack import LocalStack

from .service_process import BIN

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS / "rules" / "recording.yml", PROMETHEUS / "rules" / "alerts.yml"]
DASHBOARD = ROOT / "deploy" / "grafana" / "gharial.json"
EXAMPLE = ROOT / "clients" / "examples" / "cathy-arctic-b0460.flac"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus)"
)

# A metric name in PromQL: `gharial_...`, not the tail of a recording rule's `gharial:...` name.
_METRIC = re.compile(r"(?<![\w:])gharial_[A-Za-z0-9_]*")
_RECORDED = re.compile(r"(?<![\w:])gharial:[A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_the_scrape_config() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 2 rule files found" in out


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    _promtool("check", "rules", *(str(p.relative_to(PROMETHEUS)) for p in RULE_FILES))


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(PROMETHEUS)) for p in (PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    out = _promtool("test", "rules", *tests)
    assert "FAILED" not in out


def _rules() -> list[dict[str, Any]]:
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


def _expressions() -> dict[str, str]:
    """Every PromQL expression of the rules and the dashboard, keyed by where it comes from."""
    exprs = {f"rule {r.get('record') or r.get('alert')}": r["expr"] for r in _rules()}
    for k, expr in enumerate(_dashboard_exprs(json.loads(DASHBOARD.read_text()))):
        exprs[f"dashboard target {k}"] = expr
    return exprs


def test_every_alert_has_severity_summary_and_description_and_a_unit_test() -> None:
    alerts = [r for r in _rules() if "alert" in r]
    assert len(alerts) >= 5
    tested = "\n".join(p.read_text() for p in (PROMETHEUS / "tests").glob("*.yml"))
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
        assert f"alertname: {alert['alert']}\n" in tested, f"no promtool test for {alert['alert']}"


def test_dashboard_has_a_prometheus_datasource_variable_and_uses_it() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = dashboard["templating"]["list"]
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= variables[0].items()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_every_recorded_series_used_is_recorded() -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    used = {name for expr in _expressions().values() for name in _RECORDED.findall(expr)}
    assert used and used <= recorded, used - recorded


def _exported(text: str) -> set[str]:
    """Series names a /metrics page exports, including families that have no samples yet (a labelled
    counter nobody has incremented still has its `# TYPE` line)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_rules_and_dashboard_use_is_exported_by_the_real_stack(tmp_path: Path) -> None:
    referenced: dict[str, set[str]] = {}
    for where, expr in _expressions().items():
        for name in _METRIC.findall(expr):
            referenced.setdefault(name, set()).add(where)
    assert len(referenced) >= 10

    stack = LocalStack(cards=1, backend="accelerator", gateway_port=0, workdir=tmp_path)
    stack.up()
    try:
        host, port = stack.gateway_address
        client = [str(BIN / "gharial"), "client", str(EXAMPLE), "--no-realtime"]
        done = subprocess.run(
            [*client, "--host", host, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        pages = {}
        for service in stack.services:
            url = f"http://127.0.0.1:{service.ports['metrics_port']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                pages[service.name] = response.read().decode()
    finally:
        stack.down()

    assert set(pages) == {"license", "compiler", "emulator-0", "transcriber-0", "gateway"}
    exported = set().union(*(_exported(page) for page in pages.values()))
    # The clip went through, so the latency histograms the SLO rules use have samples.
    assert re.search(r"^gharial_gateway_frame_latency_seconds_count [1-9]", pages["gateway"], re.M)
    assert re.search(r"^gharial_transcriber_frame_latency_seconds_count [1-9]", pages["transcriber-0"], re.M)
    missing = {name: sorted(where) for name, where in referenced.items() if name not in exported}
    assert not missing, f"metrics used but not exported by any service: {missing}"
