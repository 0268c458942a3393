"""The licence service as deployed: the real `gharial-license` process on loopback, spoken to over
gRPC, scraped over HTTP and stopped with SIGTERM; plus the servicer in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from gharial.licensing import LicenseStore, Verdict, generate_keys, utc_today
from gharial.plumbing.grpc_server import GrpcServer
from gharial.protos import license_pb2, license_pb2_grpc
from services.license.server import SERVICE_NAME, LicenseServicer, proto_verdict

from .service_process import ServiceProcess, running
from .test_license import edit, issue

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "gharial-license"
# The console script appears once `make install` has run with it declared; until then, the same
# main() via -m (PYTHONPATH: the `services` package lives at the repository root).
COMMAND = (
    [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "services.license.server"]
)
FAR = date(2099, 1, 1)


@pytest.fixture
def lic_dir(tmp_path: Path) -> Path:
    """card-0: valid; card-1: expired; card-2: tampered; junk.lic: malformed."""
    private_key, public_key = generate_keys(tmp_path / "vendor")
    lic_dir = tmp_path / "lic"
    lic_dir.mkdir()
    (lic_dir / "vendor.pub").write_bytes(public_key.read_bytes())
    issue(lic_dir, private_key, "L-1.lic", license_id="L-1", card_id="card-0", expires=FAR)
    issue(lic_dir, private_key, "L-2.lic", license_id="L-2", card_id="card-1", expires=date(2020, 1, 1))
    issue(lic_dir, private_key, "L-3.lic", license_id="L-3", card_id="card-2", expires=FAR)
    edit(lic_dir / "L-3.lic", max_program_version="9.9.9")
    (lic_dir / "junk.lic").write_text("not a licence")
    return lic_dir


@pytest.fixture
def service(lic_dir: Path) -> Iterator[ServiceProcess]:
    args = ["--license-dir", str(lic_dir), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
    with running([*COMMAND, *args], env={"PYTHONPATH": str(REPO)}) as svc:
        yield svc


def metrics(svc: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The licence samples, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(svc.metrics())
        for sample in family.samples
        if sample.name.startswith("gharial_licen")
    }


def test_service_answers_checks_reports_metrics_and_stops_on_sigterm(
    service: ServiceProcess, lic_dir: Path
) -> None:
    for name in ["", SERVICE_NAME]:
        assert service.health(name) == health_pb2.HealthCheckResponse.SERVING
    with service.channel() as channel:
        stub = license_pb2_grpc.LicenseStub(channel)

        def ask(card: str, version: str = "0.1.0", released: str = "2026-01-01") -> license_pb2.CheckReply:
            request = license_pb2.CheckRequest(card_id=card, program_version=version, release_date=released)
            return stub.Check(request, timeout=10)

        reply = ask("card-0")
        assert reply.allowed and reply.verdict == license_pb2.VERDICT_ALLOWED
        assert reply.reason.startswith("licence L-1 for card card-0 allows program version 0.1.0")
        assert reply.license.license_id == "L-1" and reply.license.file == "L-1.lic"
        assert reply.license.days_to_expiry == (FAR - utc_today()).days

        refusals = [
            (ask("card-1"), license_pb2.VERDICT_EXPIRED, "L-2 for card card-1 expired on 2020-01-01"),
            (
                ask("card-2"),
                license_pb2.VERDICT_BAD_SIGNATURE,
                "L-3 for card card-2 in L-3.lic has a bad signature",
            ),
            (
                ask("card-0", version="0.2.0"),
                license_pb2.VERDICT_VERSION_TOO_NEW,
                "L-1 for card card-0 allows program versions up to 0.1.0, not 0.2.0",
            ),
            (
                ask("card-0", released="2026-07-01"),
                license_pb2.VERDICT_RELEASE_TOO_NEW,
                "L-1 for card card-0 allows programs released up to 2026-06-30, not 2026-07-01",
            ),
        ]
        for reply, verdict, reason in refusals:
            assert not reply.allowed and reply.verdict == verdict
            assert reply.reason.startswith(f"licence {reason}"), reply.reason
        reply = ask("card-9")
        assert reply.verdict == license_pb2.VERDICT_NO_LICENSE_FOR_CARD and not reply.HasField("license")
        assert (
            reply.reason
            == "no licence names card card-9 (licences name card-0, card-1, card-2; malformed: junk.lic)"
        )

        with pytest.raises(grpc.RpcError) as err:
            ask("card-0", released="soon")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "release_date 'soon' is not a date" in str(err.value.details())

        listed = {
            info.file: info
            for info in stub.ListLicenses(license_pb2.ListLicensesRequest(), timeout=10).licenses
        }
        assert {name: info.state for name, info in listed.items()} == {
            "L-1.lic": license_pb2.VERDICT_ALLOWED,
            "L-2.lic": license_pb2.VERDICT_EXPIRED,
            "L-3.lic": license_pb2.VERDICT_BAD_SIGNATURE,
            "junk.lic": license_pb2.VERDICT_MALFORMED,
        }
        assert listed["junk.lic"].state_reason.startswith("licence file junk.lic is malformed: Invalid JSON")

        scraped = metrics(service)
        checks = {
            dict(labels)["verdict"]: value
            for (name, labels), value in scraped.items()
            if name == "gharial_license_checks_total"
        }
        verdicts = [
            "ALLOWED",
            "EXPIRED",
            "BAD_SIGNATURE",
            "VERSION_TOO_NEW",
            "RELEASE_TOO_NEW",
            "NO_LICENSE_FOR_CARD",
        ]
        assert checks == dict.fromkeys(verdicts, 1.0)
        today = utc_today()
        expected = [
            ("L-1", "card-0", FAR, 1),
            ("L-2", "card-1", date(2020, 1, 1), 0),
            ("L-3", "card-2", FAR, 0),
        ]
        for license_id, card, expires, valid in expected:
            labels = (("card_id", card), ("license_id", license_id))
            assert scraped[("gharial_license_expiry_days", labels)] == (expires - today).days
            assert scraped[("gharial_license_valid", labels)] == valid
        assert scraped[("gharial_licenses_loaded", ())] == 4

        # A licence added while the service runs (a Secret update) is used at once.
        vendor_key = lic_dir.parent / "vendor" / "vendor.key"
        issue(lic_dir, vendor_key, "L-4.lic", license_id="L-4", card_id="card-9", expires=FAR)
        assert ask("card-9").allowed
        assert metrics(service)[("gharial_licenses_loaded", ())] == 5

    assert service.terminate(timeout=10) == 0
    assert service.events("server_stopped")


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_service_refuses_to_start_without_licences(tmp_path: Path, state: str, how: str) -> None:
    directory = tmp_path / "lic"
    if state == "empty":
        directory.mkdir()
        (directory / "vendor.pub").write_text("a key but no licence")
    flags = ["--license-dir", str(directory)] if how == "flag" else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if how == "env":
        env["GHARIAL_LICENSE_LICENSE_DIR"] = str(directory)
    command = [*COMMAND, *flags, "--port", "0", "--metrics-port", "0"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    problem = "does not exist" if state == "missing" else "holds no .lic files"
    reason = f"licence directory {directory} {problem}"
    assert out.returncode == 2
    assert f"error: {reason}" in out.stderr
    logged = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert {"event": "startup_failed", "reason": reason}.items() <= logged[-1].items()


def test_servicer_in_process_refuses_once_the_licences_are_gone(lic_dir: Path) -> None:
    servicer = LicenseServicer(LicenseStore(lic_dir), today=lambda: date(2019, 6, 1))
    server = GrpcServer("license-test")
    server.add_service(license_pb2_grpc.add_LicenseServicer_to_server, servicer, SERVICE_NAME)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = license_pb2_grpc.LicenseStub(channel)
            request = license_pb2.CheckRequest(
                card_id="card-1", program_version="0.1.0", release_date="2019-01-01"
            )
            reply = stub.Check(request, timeout=10)
            assert (
                reply.allowed and reply.license.days_to_expiry == (date(2020, 1, 1) - date(2019, 6, 1)).days
            )
            for path in lic_dir.glob("*.lic"):
                path.unlink()
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"licence directory {lic_dir} holds no .lic files"
    finally:
        server.stop(grace_s=0)


def test_every_verdict_has_its_proto_value() -> None:
    assert sorted(proto_verdict(v) for v in Verdict) == sorted(
        set(license_pb2.Verdict.values()) - {license_pb2.VERDICT_UNSPECIFIED}
    )
