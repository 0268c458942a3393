"""deploy/kustomize: the base is the chart's default rendering (kept current by
deploy/tools/sync_generated.py), the overlays patch it. Each is built with `kubectl kustomize`,
validated against the Kubernetes 1.29 schemas, and checked for what it promises: dev is one CPU
worker equal to the chart's CPU card pod, prod four cards on an external Redis with an autoscaled
gateway."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import pytest
import yaml

from .test_helm import (
    ROOT,
    Manifest,
    assert_hardened,
    assert_probed,
    containers,
    find,
    pods,
    render,
    validate,
)

KUSTOMIZE = ROOT / "deploy" / "kustomize"
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")


def build(overlay: str) -> list[Manifest]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(KUSTOMIZE / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_base_is_the_current_chart_rendering() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "tools" / "sync_generated.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"{out.stdout}{out.stderr}run .venv/bin/python deploy/tools/sync_generated.py"


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/prod"])
def test_builds_valid_hardened_probed_manifests(overlay: str) -> None:
    docs = build(overlay)
    validate(docs)
    assert_hardened(docs)
    assert_probed(docs)
    assert {d["metadata"]["labels"]["app.kubernetes.io/managed-by"] for d in docs} == {"kustomize"}


def test_dev_is_one_cpu_worker_like_the_chart() -> None:
    docs = build("overlays/dev")
    assert {d["metadata"]["namespace"] for d in docs} == {"gharial-dev"}
    assert not [
        d
        for d in docs
        if d["metadata"]["name"] in ("gharial-license", "gharial-compiler", "gharial-emulator")
    ]
    (cards,) = find(docs, "StatefulSet", "gharial-card")
    assert cards["spec"]["replicas"] == 1
    assert [c["name"] for c in containers(cards["spec"]["template"]["spec"])] == ["transcriber"]
    assert find(docs, "Deployment", "gharial-gateway")[0]["spec"]["replicas"] == 1
    assert find(docs, "Deployment", "gharial-redis")
    # Apart from its smaller requests, the card pod and its settings are the chart's CPU worker.
    chart = render("values.yaml", "--set", "backend=cpu,cards=1,compiler.enabled=false")
    for config in ("gharial-transcriber", "gharial-gateway"):
        assert find(docs, "ConfigMap", config)[0]["data"] == find(chart, "ConfigMap", config)[0]["data"]
    (chart_cards,) = find(chart, "StatefulSet", "gharial-card")
    ours, theirs = copy.deepcopy([cards["spec"]["template"]["spec"], chart_cards["spec"]["template"]["spec"]])
    for spec in (ours, theirs):
        for container in spec["containers"]:
            del container["resources"]
    assert ours == theirs
    ports = lambda docs: [s["spec"]["ports"] for s in find(docs, "Service", "gharial-card")]  # noqa: E731
    assert ports(docs) == ports(chart)
    ingress = lambda docs: find(docs, "NetworkPolicy", "gharial-card")[0]["spec"]["ingress"]  # noqa: E731
    assert ingress(docs) == ingress(chart)


def test_prod_is_four_cards_on_external_redis_with_an_autoscaled_gateway() -> None:
    docs = build("overlays/prod")
    assert {d["metadata"]["namespace"] for d in docs} == {"gharial"}
    (cards,) = find(docs, "StatefulSet", "gharial-card")
    assert cards["spec"]["replicas"] == 4
    assert [c["name"] for c in containers(cards["spec"]["template"]["spec"])] == [
        "compile",
        "emulator",
        "transcriber",
    ]
    assert not [d for d in docs if d["metadata"]["name"] == "gharial-redis"]
    urls = {
        value
        for config in find(docs, "ConfigMap")
        for key, value in config["data"].items()
        if key.endswith("_REDIS_URL")
    }
    assert len(urls) == 1 and "gharial-redis" not in urls.pop()
    (gateway,) = find(docs, "Deployment", "gharial-gateway")
    assert "replicas" not in gateway["spec"], "the autoscaler owns the replica count"
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gharial-gateway"
    assert {name for name, _ in pods(docs)} == {
        "gharial-gateway",
        "gharial-card",
        "gharial-license",
        "gharial-compiler",
    }
