"""`gharial-license`: the licence service (DESIGN §5).

Serves `gharial.v1.License` over gRPC from a licence directory (a Kubernetes Secret in deploy), which
it re-reads whenever its files change. It only verifies licences: the vendor's private key never
comes near it. Every flag can also be set as GHARIAL_LICENSE_<FLAG>, e.g. GHARIAL_LICENSE_LICENSE_DIR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import typer
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gharial.licensing import License, LicenseError, LicenseStore, Verdict, check, utc_today
from gharial.plumbing.grpc_server import GrpcServer
from gharial.plumbing.logs import LogLevel, configure_logging, log_event
from gharial.protos import license_pb2, license_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "gharial.v1.License"
ENV_PREFIX = "GHARIAL_LICENSE_"

CHECKS = Counter("gharial_license_checks", "Licence checks answered, by verdict", ["verdict"])


def proto_verdict(verdict: Verdict) -> license_pb2.Verdict:
    return license_pb2.Verdict.Value(f"VERDICT_{verdict.value}")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """`context.abort` raises to end the RPC; this says so to the type checker."""
    context.abort(code, message)
    raise AssertionError("context.abort returned")


def license_info(lic: License, today: date) -> license_pb2.LicenseInfo:
    summary = lic.summary(today)
    fields = summary.model_dump(exclude={"state"}, exclude_none=True)
    return license_pb2.LicenseInfo(**fields, state=proto_verdict(summary.state))


class LicenseServicer(license_pb2_grpc.LicenseServicer):
    """Answers from a `LicenseStore`; `today` is a parameter so tests can move the clock."""

    def __init__(self, store: LicenseStore, today: Callable[[], date] = utc_today) -> None:
        self.store = store
        self.today = today

    def _licenses(self, context: grpc.ServicerContext) -> list[License]:
        try:
            return self.store.licenses()
        except LicenseError as err:
            # The directory or key went away after startup: refuse loudly rather than guess.
            log_event(log, "licenses_unavailable", logging.ERROR, reason=str(err))
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def Check(
        self, request: license_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> license_pb2.CheckReply:
        if not request.card_id:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "card_id is empty")
        try:
            release_date = date.fromisoformat(request.release_date)
        except ValueError:
            message = f"release_date {request.release_date!r} is not a date (YYYY-MM-DD)"
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)
        licenses = self._licenses(context)
        today = self.today()
        try:
            result = check(licenses, request.card_id, request.program_version, release_date, today)
        except ValueError as err:  # the program version is not a version
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        CHECKS.labels(verdict=result.verdict.value).inc()
        log_event(
            log,
            "license_checked",
            card_id=request.card_id,
            program_version=request.program_version,
            release_date=request.release_date,
            verdict=result.verdict.value,
            reason=result.reason,
        )
        reply = license_pb2.CheckReply(
            allowed=result.allowed, verdict=proto_verdict(result.verdict), reason=result.reason
        )
        if result.license is not None:
            reply.license.CopyFrom(license_info(result.license, today))
        return reply

    def ListLicenses(
        self, request: license_pb2.ListLicensesRequest, context: grpc.ServicerContext
    ) -> license_pb2.ListLicensesReply:
        today = self.today()
        return license_pb2.ListLicensesReply(
            licenses=[license_info(lic, today) for lic in self._licenses(context)]
        )


class LicenseMetrics(Collector):
    """Licence state, computed at each scrape so days to expiry stay current and removed licences
    disappear. Malformed files name no licence: they count only in `gharial_licenses_loaded`."""

    def __init__(self, store: LicenseStore, today: Callable[[], date] = utc_today) -> None:
        self.store = store
        self.today = today

    def collect(self) -> Iterator[Metric]:
        try:
            licenses = self.store.licenses()
        except LicenseError:
            licenses = []
        labels = ["license_id", "card_id"]
        expiry = GaugeMetricFamily(
            "gharial_license_expiry_days",
            "Whole days until the licence expires (negative once expired)",
            labels=labels,
        )
        valid = GaugeMetricFamily(
            "gharial_license_valid",
            "1 if the licence is valid today (signature, format, expiry), else 0",
            labels=labels,
        )
        today = self.today()
        # Two files may hold the same licence; one series each, and a valid copy wins.
        series: dict[tuple[str, str], tuple[int, bool]] = {}
        for lic in licenses:
            if lic.body is None:
                continue
            key = (lic.body.license_id, lic.body.card_id)
            is_valid = lic.state(today)[0] is Verdict.ALLOWED
            if key not in series or is_valid:
                series[key] = ((lic.body.expires - today).days, is_valid)
        for key, (days, is_valid) in sorted(series.items()):
            expiry.add_metric(list(key), days)
            valid.add_metric(list(key), int(is_valid))
        yield expiry
        yield valid
        yield GaugeMetricFamily(
            "gharial_licenses_loaded",
            "Licence files read from the licence directory, valid or not",
            value=len(licenses),
        )


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def serve(
    license_dir: Annotated[
        Path,
        typer.Option(
            envvar=f"{ENV_PREFIX}LICENSE_DIR",
            help="directory of *.lic licence files (a mounted Secret in deploy)",
        ),
    ],
    public_key: Annotated[
        Path | None,
        typer.Option(
            envvar=f"{ENV_PREFIX}PUBLIC_KEY",
            help="the vendor's public key (PEM); default: LICENSE_DIR/vendor.pub",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(envvar=f"{ENV_PREFIX}HOST", help="address to serve gRPC and /metrics on")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar=f"{ENV_PREFIX}PORT", min=0, help="gRPC port (0: any free port)")
    ] = 50053,
    metrics_port: Annotated[
        int,
        typer.Option(
            envvar=f"{ENV_PREFIX}METRICS_PORT", min=0, help="Prometheus /metrics port (0: any free port)"
        ),
    ] = 9093,
    log_level: Annotated[
        LogLevel,
        typer.Option(envvar=f"{ENV_PREFIX}LOG_LEVEL", case_sensitive=False, help="least severe level logged"),
    ] = LogLevel.INFO,
) -> None:
    """Serve gharial.v1.License: may card X run program P? Stops gracefully on SIGTERM."""
    configure_logging("license", log_level.value)
    store = LicenseStore(license_dir, public_key)
    server = GrpcServer("license", host, port)
    try:
        store.licenses()
        server.add_service(
            license_pb2_grpc.add_LicenseServicer_to_server, LicenseServicer(store), SERVICE_NAME
        )
        REGISTRY.register(LicenseMetrics(store))
        server.start(metrics_port=metrics_port)
    except (LicenseError, OSError) as err:
        log_event(log, "startup_failed", logging.ERROR, reason=str(err))
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    server.run_until_signal()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
