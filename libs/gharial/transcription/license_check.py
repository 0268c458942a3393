"""May this card run this program? Asked once at start (DESIGN §5): of the licence service, or of a
licence directory read here with `gharial.licensing` (the same verdicts and reasons either way)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict

from gharial.accelerator.program import ProgramMeta
from gharial.licensing import LicenseError, check, load_license_dir, utc_today
from gharial.protos import license_pb2, license_pb2_grpc

CHECK_TIMEOUT_S = 30.0  # start-up waits this long for the licence service


class LicenseUnavailable(Exception):
    """No answer could be had (service unreachable, directory or key unusable)."""


class LicenseDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    allowed: bool
    verdict: str  # gharial.licensing.Verdict's names, e.g. ALLOWED, EXPIRED, NO_LICENSE_FOR_CARD
    reason: str


def ask_license_service(address: str, card_id: str, program: ProgramMeta) -> LicenseDecision:
    request = license_pb2.CheckRequest(
        card_id=card_id, program_version=program.program_version, release_date=program.release_date
    )
    with grpc.insecure_channel(address) as channel:
        try:
            reply = license_pb2_grpc.LicenseStub(channel).Check(
                request, timeout=CHECK_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.RpcError as error:
            raise LicenseUnavailable(
                f"licence service at {address}: {error.code().name}: {error.details()}"
            ) from error
    verdict = license_pb2.Verdict.Name(reply.verdict).removeprefix("VERDICT_")
    return LicenseDecision(allowed=reply.allowed, verdict=verdict, reason=reply.reason)


def check_license_dir(
    directory: Path, public_key: Path | None, card_id: str, program: ProgramMeta
) -> LicenseDecision:
    try:
        licenses = load_license_dir(directory, public_key)
        release_date = date.fromisoformat(program.release_date)
        result = check(licenses, card_id, program.program_version, release_date, utc_today())
    except (LicenseError, ValueError) as error:
        raise LicenseUnavailable(str(error)) from error
    return LicenseDecision(allowed=result.allowed, verdict=result.verdict.value, reason=result.reason)
