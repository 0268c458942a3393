"""Per-card licences (DESIGN §5): may card X run program P?

A licence is a JSON file (``*.lic``) holding the signed body and its Ed25519 signature::

    {"license": {...LicenseBody...}, "signature": "<base64>", "key_id": "<sha256 prefix of the key>"}

The signature covers the canonical JSON of the body exactly as it stands in the file (sorted keys,
no spaces), so editing any field afterwards breaks it. The vendor signs with a private key that
stays on the vendor's machine (`gharial license issue`); services and customers only ever hold the
public key. A licence directory (a Kubernetes Secret in deploy) holds the ``*.lic`` files and, by
default, the public key as ``vendor.pub`` beside them; an explicit public key path overrides it.

A bad file never stops the others from loading: it becomes a `License` whose `problem` says why
(malformed or bad signature), so listings show it and checks can name it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from gharial.plumbing.logs import log_event

log = logging.getLogger(__name__)

LICENSE_SUFFIX = ".lic"
PRIVATE_KEY_NAME = "vendor.key"
PUBLIC_KEY_NAME = "vendor.pub"
KEY_ID_CHARS = 16


class LicenseError(Exception):
    """The licences cannot be used at all (no directory, no licence files, no public key)."""


class Verdict(StrEnum):
    """The answer to a check; the names are protos/license.proto's `Verdict` without `VERDICT_`."""

    ALLOWED = "ALLOWED"
    NO_LICENSE_FOR_CARD = "NO_LICENSE_FOR_CARD"
    EXPIRED = "EXPIRED"
    VERSION_TOO_NEW = "VERSION_TOO_NEW"
    RELEASE_TOO_NEW = "RELEASE_TOO_NEW"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    MALFORMED = "MALFORMED"


def parse_version(version: str) -> tuple[int, ...]:
    """ "0.10.0" → (0, 10): compared numerically part by part; trailing zeros dropped so "0.1" == "0.1.0"."""
    parts = version.split(".")
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f"version {version!r} is not dot-separated numbers such as 0.1.0")
    numbers = [int(part) for part in parts]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


class LicenseBody(BaseModel):
    """The signed part of a licence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    license_id: str = Field(min_length=1)
    card_id: str = Field(min_length=1)
    licensee: str = ""
    # The highest program version and the latest program release date the card may run.
    max_program_version: str
    max_release_date: date
    # The last day the licence is valid (inclusive).
    expires: date
    issued: AwareDatetime

    @field_validator("max_program_version")
    @classmethod
    def _version(cls, value: str) -> str:
        parse_version(value)
        return value

    @property
    def name(self) -> str:
        return f"licence {self.license_id} for card {self.card_id}"


class SignedLicense(BaseModel):
    """A `.lic` file. `license` stays raw JSON: the signature covers it exactly as written."""

    model_config = ConfigDict(extra="forbid")

    license: dict[str, Any]
    signature: str
    key_id: str


def canonical_json(body: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- keys ---------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short SHA-256 fingerprint of the raw public key: says which vendor key signed a licence."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def generate_keys(directory: Path) -> tuple[Path, Path]:
    """Write a new vendor key pair: DIR/vendor.key (PEM, mode 0600) and DIR/vendor.pub (PEM).

    Refuses to overwrite either file: losing the private key would orphan every licence issued."""
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise LicenseError(f"{path} already exists; refusing to overwrite a key")
    directory.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created with 0600 from the start, so the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise LicenseError(f"cannot read private key {path}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise LicenseError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as err:
        raise LicenseError(f"public key {path} does not exist (give its path with --public-key)") from err
    except (OSError, ValueError) as err:
        raise LicenseError(f"cannot read public key {path}: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise LicenseError(f"{path} is not an Ed25519 public key")
    return key


def default_public_key(path: Path) -> Path:
    """vendor.pub in the licence directory, or beside the licence file when given one."""
    return (path if path.is_dir() else path.parent) / PUBLIC_KEY_NAME


# --- issuing ------------------------------------------------------------------------------------


def sign_license(body: LicenseBody, private_key: Ed25519PrivateKey) -> SignedLicense:
    raw = body.model_dump(mode="json")
    signature = private_key.sign(canonical_json(raw))
    return SignedLicense(
        license=raw, signature=base64.b64encode(signature).decode(), key_id=key_id(private_key.public_key())
    )


def write_license(path: Path, signed: SignedLicense) -> None:
    """Write a `.lic` file; refuses to overwrite one (a licence, once issued, is not edited)."""
    if path.suffix != LICENSE_SUFFIX:
        raise LicenseError(f"{path}: a licence file must end in {LICENSE_SUFFIX} (only those are read)")
    try:
        with path.open("x") as f:
            f.write(signed.model_dump_json(indent=2) + "\n")
    except FileExistsError as err:
        raise LicenseError(f"{path} already exists; refusing to overwrite a licence") from err


# --- verifying ----------------------------------------------------------------------------------


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


class LicenseSummary(BaseModel):
    """A licence as listed: the fields of protos/license.proto's `LicenseInfo` ("" when unknown)."""

    model_config = ConfigDict(extra="forbid")

    license_id: str = ""
    card_id: str = ""
    licensee: str = ""
    max_program_version: str = ""
    max_release_date: str = ""
    expires: str = ""
    issued: str = ""
    file: str
    state: Verdict
    state_reason: str
    days_to_expiry: int | None = None


@dataclass(frozen=True)
class License:
    """One licence file as loaded. `body` is None when the file is malformed; with a bad signature
    it holds the (untrusted) fields the file claims, so messages can name them."""

    file: str
    body: LicenseBody | None
    key_id: str = ""  # of the key the file says signed it
    signature_valid: bool = False
    problem: Verdict | None = None  # BAD_SIGNATURE or MALFORMED
    problem_reason: str = ""

    @property
    def name(self) -> str:
        return self.body.name if self.body is not None else f"licence file {self.file}"

    def state(self, today: date) -> tuple[Verdict, str]:
        """Whether the licence itself is valid today (signature, format, expiry), and why."""
        if self.problem is not None:
            return self.problem, self.problem_reason
        assert self.body is not None
        if today > self.body.expires:
            return Verdict.EXPIRED, f"{self.name} expired on {self.body.expires} (today is {today})"
        days = (self.body.expires - today).days
        return Verdict.ALLOWED, f"{self.name} is valid through {self.body.expires} ({days} days left)"

    def evaluate(self, program_version: str, release_date: date, today: date) -> CheckResult:
        """Whether this licence allows the program, and why not."""
        verdict, reason = self.state(today)
        if verdict is Verdict.ALLOWED:
            assert self.body is not None
            if parse_version(program_version) > parse_version(self.body.max_program_version):
                verdict = Verdict.VERSION_TOO_NEW
                reason = (
                    f"{self.name} allows program versions up to {self.body.max_program_version}, "
                    f"not {program_version}"
                )
            elif release_date > self.body.max_release_date:
                verdict = Verdict.RELEASE_TOO_NEW
                reason = (
                    f"{self.name} allows programs released up to {self.body.max_release_date}, "
                    f"not {release_date}"
                )
            else:
                reason = (
                    f"{self.name} allows program version {program_version} released {release_date} "
                    f"(valid through {self.body.expires})"
                )
        return CheckResult(verdict, reason, self)

    def summary(self, today: date) -> LicenseSummary:
        state, reason = self.state(today)
        fields: dict[str, Any] = {}
        if self.body is not None:
            body = self.body
            fields = {
                "license_id": body.license_id,
                "card_id": body.card_id,
                "licensee": body.licensee,
                "max_program_version": body.max_program_version,
                "max_release_date": body.max_release_date.isoformat(),
                "expires": body.expires.isoformat(),
                "issued": body.issued.isoformat(),
                "days_to_expiry": (body.expires - today).days,
            }
        return LicenseSummary(file=self.file, state=state, state_reason=reason, **fields)


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    reason: str
    # The licence that allows it, or the closest one that does not (None: no licence names the card).
    license: License | None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOWED


def load_license_file(path: Path, public_key: Ed25519PublicKey) -> License:
    """Load and verify one licence; a bad file gives a `License` with its problem, never an exception."""
    file = path.name
    try:
        signed = SignedLicense.model_validate_json(path.read_bytes())
    except OSError as err:
        reason = f"licence file {file} cannot be read: {err}"
        return License(file, None, problem=Verdict.MALFORMED, problem_reason=reason)
    except ValidationError as err:
        reason = f"licence file {file} is malformed: {_first_error(err)}"
        return License(file, None, problem=Verdict.MALFORMED, problem_reason=reason)
    claimed: LicenseBody | None = None
    body_error = ""
    try:
        claimed = LicenseBody.model_validate(signed.license)
    except ValidationError as err:
        body_error = _first_error(err)
    label = f"{claimed.name} in {file}" if claimed is not None else f"licence file {file}"
    vendor = key_id(public_key)
    bad_signature: str | None = None
    if signed.key_id != vendor:
        bad_signature = f"{label} is signed by key {signed.key_id}, not the vendor key {vendor}"
    else:
        try:
            signature = base64.b64decode(signed.signature, validate=True)
            public_key.verify(signature, canonical_json(signed.license))
        except (InvalidSignature, ValueError):
            bad_signature = f"{label} has a bad signature: forged, or edited after signing"
    if bad_signature is not None:
        return License(file, claimed, signed.key_id, False, Verdict.BAD_SIGNATURE, bad_signature)
    if claimed is None:
        reason = f"licence file {file} is malformed: license.{body_error}"
        return License(file, None, signed.key_id, True, Verdict.MALFORMED, reason)
    return License(file, claimed, signed.key_id, True)


def _license_paths(directory: Path) -> list[Path]:
    """Top level only: a mounted Secret's visible names link to its hidden `..data/` copies."""
    return sorted(p for p in directory.glob(f"*{LICENSE_SUFFIX}") if not p.name.startswith("."))


def license_files(directory: Path) -> list[Path]:
    """The directory's `*.lic` files; raises `LicenseError` if it is missing or holds none."""
    if not directory.is_dir():
        raise LicenseError(f"licence directory {directory} does not exist")
    files = _license_paths(directory)
    if not files:
        raise LicenseError(f"licence directory {directory} holds no {LICENSE_SUFFIX} files")
    return files


def load_license_dir(directory: Path, public_key_path: Path | None = None) -> list[License]:
    """Every licence in the directory, verified with `public_key_path` (default: vendor.pub in the
    directory); raises `LicenseError` if the directory is missing, holds no licence or lacks the key."""
    files = license_files(directory)
    public_key = load_public_key(public_key_path or directory / PUBLIC_KEY_NAME)
    return [load_license_file(path, public_key) for path in files]


_REFUSAL_RANK = [
    # Most relevant first: a genuine licence in force that falls short says what to renew.
    Verdict.VERSION_TOO_NEW,
    Verdict.RELEASE_TOO_NEW,
    Verdict.EXPIRED,
    Verdict.BAD_SIGNATURE,
    Verdict.MALFORMED,
]


def check(
    licenses: Sequence[License], card_id: str, program_version: str, release_date: date, today: date
) -> CheckResult:
    """May `card_id` run the program? Any valid licence for the card that allows it is enough;
    otherwise the most relevant refusal. Raises ValueError for an unparseable program version."""
    parse_version(program_version)
    results = [
        lic.evaluate(program_version, release_date, today)
        for lic in licenses
        if lic.body is not None and lic.body.card_id == card_id
    ]
    if not results:
        cards = sorted({lic.body.card_id for lic in licenses if lic.body is not None})
        malformed = [lic.file for lic in licenses if lic.body is None]
        notes = [f"licences name {', '.join(cards)}"] if cards else []
        notes += [f"malformed: {', '.join(malformed)}"] if malformed else []
        held = f" ({'; '.join(notes)})" if notes else ""
        return CheckResult(Verdict.NO_LICENSE_FOR_CARD, f"no licence names card {card_id}{held}", None)

    def expires(result: CheckResult) -> date:
        assert result.license is not None and result.license.body is not None
        return result.license.body.expires

    allowed = [r for r in results if r.allowed]
    if allowed:
        return max(allowed, key=expires)
    return min(results, key=lambda r: (_REFUSAL_RANK.index(r.verdict), -expires(r).toordinal()))


def utc_today() -> date:
    return datetime.now(UTC).date()


# (path, inode, mtime, size) of each file a load depends on; the store reloads when it changes.
Stamp = list[tuple[str, int, int, int]]


class LicenseStore:
    """The licences of one directory, re-read whenever its files change.

    Kubernetes updates a mounted Secret in place (it swaps a symlink), so every read compares the
    directory's, the licence files' and the public key's modification times and sizes with the last
    load and reloads on any difference. The public key is `public_key_path`, or vendor.pub in the
    directory when that is None."""

    def __init__(self, directory: Path, public_key_path: Path | None = None) -> None:
        self.directory = directory
        self.public_key_path = public_key_path or directory / PUBLIC_KEY_NAME
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._licenses: list[License] = []

    def _current_stamp(self) -> Stamp:
        paths = [self.directory, self.public_key_path, *_license_paths(self.directory)]
        stamp: Stamp = []
        for path in paths:
            try:
                stat = path.stat()
                stamp.append((str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:  # missing (e.g. a dangling link): the load reports it
                stamp.append((str(path), 0, 0, -1))
        return sorted(stamp)

    def licenses(self) -> list[License]:
        """The current licences; raises `LicenseError` while the directory or key is unusable."""
        with self._lock:
            stamp = self._current_stamp()
            if stamp != self._stamp:
                self._licenses = load_license_dir(self.directory, self.public_key_path)
                self._stamp = stamp
                self._log_loaded()
            return self._licenses

    def _log_loaded(self) -> None:
        today = utc_today()
        for lic in self._licenses:
            verdict, reason = lic.state(today)
            if verdict is not Verdict.ALLOWED:
                log_event(log, "license_invalid", logging.WARNING, file=lic.file, reason=reason)
        log_event(log, "licenses_loaded", directory=str(self.directory), count=len(self._licenses))

    def check(self, card_id: str, program_version: str, release_date: date, today: date) -> CheckResult:
        return check(self.licenses(), card_id, program_version, release_date, today)
