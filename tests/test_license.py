"""Licences (DESIGN §5): signing, verification, every refusal with its reason, the directory store
and the `gharial license` CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gharial.cli.main import app
from gharial.licensing import (
    LicenseBody,
    LicenseError,
    LicenseStore,
    SignedLicense,
    Verdict,
    canonical_json,
    check,
    generate_keys,
    key_id,
    load_license_dir,
    load_private_key,
    load_public_key,
    parse_version,
    sign_license,
    write_license,
)

TODAY = date(2026, 3, 1)
BODY: dict[str, Any] = {
    "license_id": "L-7",
    "card_id": "card-0",
    "licensee": "ACME",
    "max_program_version": "0.1.0",
    "max_release_date": date(2026, 6, 30),
    "expires": date(2027, 1, 1),
    "issued": datetime(2026, 1, 1, tzinfo=UTC),
}


def issue(license_dir: Path, private_key: Path, name: str = "L-7.lic", **fields: Any) -> Path:
    """Sign a licence with BODY's fields (overridden by `fields`) into license_dir/name."""
    path = license_dir / name
    write_license(path, sign_license(LicenseBody(**{**BODY, **fields}), load_private_key(private_key)))
    return path


def edit(path: Path, **fields: Any) -> None:
    """Change signed fields after signing, as someone tampering with a licence would."""
    signed = json.loads(path.read_text())
    signed["license"].update(fields)
    path.write_text(json.dumps(signed))


@pytest.fixture
def vendor(tmp_path: Path) -> Path:
    """The vendor's private key; the licence directory lic/ holds its vendor.pub."""
    private_key, public_key = generate_keys(tmp_path / "vendor")
    (tmp_path / "lic").mkdir()
    (tmp_path / "lic" / "vendor.pub").write_bytes(public_key.read_bytes())
    return private_key


@pytest.fixture
def lic_dir(tmp_path: Path, vendor: Path) -> Path:
    issue(tmp_path / "lic", vendor)
    return tmp_path / "lic"


def check_one(
    lic_dir: Path,
    card_id: str = "card-0",
    version: str = "0.1.0",
    released: date = date(2026, 1, 1),
    today: date = TODAY,
) -> tuple[Verdict, str]:
    result = check(load_license_dir(lic_dir), card_id, version, released, today)
    return result.verdict, result.reason


# --- library ------------------------------------------------------------------------------------


def test_versions_compare_numerically_part_by_part() -> None:
    assert parse_version("0.10.0") > parse_version("0.9.1")
    assert parse_version("1.0") == parse_version("1.0.0") > parse_version("0.99")
    for bad in ["", "v1.0", "1.x", "1..0", "-1"]:
        with pytest.raises(ValueError, match="not dot-separated numbers"):
            parse_version(bad)


def test_keygen_private_key_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    private_key, public_key = generate_keys(tmp_path / "keys")
    assert stat.S_IMODE(private_key.stat().st_mode) == 0o600
    assert key_id(load_private_key(private_key).public_key()) == key_id(load_public_key(public_key))
    before = private_key.read_bytes()
    with pytest.raises(LicenseError, match=r"vendor\.key already exists; refusing to overwrite"):
        generate_keys(tmp_path / "keys")
    assert private_key.read_bytes() == before


def test_issued_licence_verifies_and_allows_the_program(lic_dir: Path, vendor: Path) -> None:
    signed = json.loads((lic_dir / "L-7.lic").read_text())
    assert set(signed) == {"license", "signature", "key_id"}
    assert signed["key_id"] == key_id(load_private_key(vendor).public_key())
    (lic,) = load_license_dir(lic_dir)
    assert lic.signature_valid and lic.problem is None
    assert lic.state(TODAY) == (
        Verdict.ALLOWED,
        "licence L-7 for card card-0 is valid through 2027-01-01 (306 days left)",
    )
    result = check([lic], "card-0", "0.1.0", date(2026, 6, 30), TODAY)
    assert result.allowed and result.license is lic
    assert result.reason == (
        "licence L-7 for card card-0 allows program version 0.1.0 released 2026-06-30 "
        "(valid through 2027-01-01)"
    )
    assert lic.summary(TODAY).days_to_expiry == 306


def test_forged_licence_signed_by_another_key(tmp_path: Path, vendor: Path) -> None:
    forger_key, _ = generate_keys(tmp_path / "forger")
    lic_dir = tmp_path / "lic"
    issue(lic_dir, forger_key, "forged.lic")
    forger_id, vendor_id = (
        key_id(load_private_key(forger_key).public_key()),
        key_id(load_private_key(vendor).public_key()),
    )
    assert check_one(lic_dir) == (
        Verdict.BAD_SIGNATURE,
        f"licence L-7 for card card-0 in forged.lic is signed by key {forger_id}, "
        f"not the vendor key {vendor_id}",
    )
    # Claiming the vendor's key ID does not help: the signature still does not verify.
    signed = json.loads((lic_dir / "forged.lic").read_text())
    signed["key_id"] = vendor_id
    (lic_dir / "forged.lic").write_text(json.dumps(signed))
    assert check_one(lic_dir) == (
        Verdict.BAD_SIGNATURE,
        "licence L-7 for card card-0 in forged.lic has a bad signature: forged, or edited after signing",
    )


@pytest.mark.parametrize(
    ("field", "value", "card"),
    [
        ("card_id", "card-1", "card-1"),
        ("expires", "2099-01-01", "card-0"),
        ("max_program_version", "9.0.0", "card-0"),
    ],
)
def test_tampered_field_breaks_the_signature(lic_dir: Path, field: str, value: str, card: str) -> None:
    edit(lic_dir / "L-7.lic", **{field: value})
    (lic,) = load_license_dir(lic_dir)
    assert not lic.signature_valid and lic.problem is Verdict.BAD_SIGNATURE
    verdict, reason = check_one(lic_dir, card_id=card, version="0.1.0")
    assert verdict is Verdict.BAD_SIGNATURE
    assert (
        reason
        == f"licence L-7 for card {card} in L-7.lic has a bad signature: forged, or edited after signing"
    )


def test_wrong_card(lic_dir: Path) -> None:
    assert check_one(lic_dir, card_id="card-9") == (
        Verdict.NO_LICENSE_FOR_CARD,
        "no licence names card card-9 (licences name card-0)",
    )


def test_expired_after_the_expiry_day(lic_dir: Path) -> None:
    assert check_one(lic_dir, today=date(2027, 1, 1))[0] is Verdict.ALLOWED  # the last valid day
    assert check_one(lic_dir, today=date(2027, 1, 2)) == (
        Verdict.EXPIRED,
        "licence L-7 for card card-0 expired on 2027-01-01 (today is 2027-01-02)",
    )


def test_program_version_beyond_the_licence(tmp_path: Path, vendor: Path) -> None:
    lic_dir = tmp_path / "lic"
    issue(lic_dir, vendor, max_program_version="0.9.1")
    assert check_one(lic_dir, version="0.9.1")[0] is Verdict.ALLOWED
    assert check_one(lic_dir, version="0.9")[0] is Verdict.ALLOWED
    assert check_one(lic_dir, version="0.10.0") == (
        Verdict.VERSION_TOO_NEW,
        "licence L-7 for card card-0 allows program versions up to 0.9.1, not 0.10.0",
    )
    with pytest.raises(ValueError, match="'zero' is not dot-separated numbers"):
        check_one(lic_dir, version="zero")


def test_release_date_beyond_the_licence(lic_dir: Path) -> None:
    assert check_one(lic_dir, released=date(2026, 6, 30))[0] is Verdict.ALLOWED
    assert check_one(lic_dir, released=date(2026, 7, 1)) == (
        Verdict.RELEASE_TOO_NEW,
        "licence L-7 for card card-0 allows programs released up to 2026-06-30, not 2026-07-01",
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "Invalid JSON"),
        ("{not json", "Invalid JSON"),
        ('{"license": {}, "key_id": "x"}', "signature: Field required"),
        (
            '{"license": {}, "signature": "", "key_id": "x", "extra": 1}',
            "extra: Extra inputs are not permitted",
        ),
    ],
)
def test_malformed_file_is_listed_not_fatal(lic_dir: Path, content: str, problem: str) -> None:
    (lic_dir / "junk.lic").write_text(content)
    valid, junk = load_license_dir(lic_dir)  # sorted by file name
    assert junk.file == "junk.lic" and junk.body is None
    verdict, reason = junk.state(TODAY)
    assert verdict is Verdict.MALFORMED
    assert reason.startswith("licence file junk.lic is malformed: ") and problem in reason
    assert valid.state(TODAY)[0] is Verdict.ALLOWED
    assert check_one(lic_dir)[0] is Verdict.ALLOWED
    assert (
        check_one(lic_dir, card_id="card-9")[1]
        == "no licence names card card-9 (licences name card-0; malformed: junk.lic)"
    )


def test_vendor_signed_body_that_is_not_a_licence_is_malformed(lic_dir: Path, vendor: Path) -> None:
    raw = {**LicenseBody(**BODY).model_dump(mode="json"), "format_version": 2}  # a format unknown here
    key = load_private_key(vendor)
    signature = base64.b64encode(key.sign(canonical_json(raw))).decode()
    signed = SignedLicense(license=raw, signature=signature, key_id=key_id(key.public_key()))
    (lic_dir / "v2.lic").write_text(signed.model_dump_json())
    lic = next(lic for lic in load_license_dir(lic_dir) if lic.file == "v2.lic")
    assert lic.signature_valid
    assert lic.state(TODAY) == (
        Verdict.MALFORMED,
        "licence file v2.lic is malformed: license.format_version: Input should be 1",
    )


def test_missing_or_empty_directory_is_an_error(tmp_path: Path, vendor: Path) -> None:
    with pytest.raises(
        LicenseError, match=re.escape(f"licence directory {tmp_path / 'nowhere'} does not exist")
    ):
        load_license_dir(tmp_path / "nowhere")
    (tmp_path / "lic" / "README.txt").write_text("not a licence")
    with pytest.raises(
        LicenseError, match=re.escape(f"licence directory {tmp_path / 'lic'} holds no .lic files")
    ):
        load_license_dir(tmp_path / "lic")


def test_missing_public_key_is_an_error(lic_dir: Path) -> None:
    (lic_dir / "vendor.pub").unlink()
    with pytest.raises(LicenseError, match=r"vendor\.pub does not exist"):
        load_license_dir(lic_dir)


def test_any_valid_licence_allows_else_the_most_relevant_refusal(tmp_path: Path, vendor: Path) -> None:
    lic_dir = tmp_path / "lic"
    issue(lic_dir, vendor, "old.lic", license_id="L-1", expires=date(2026, 1, 1), max_program_version="0.2.0")
    issue(lic_dir, vendor, "new.lic", license_id="L-2", max_program_version="0.1.0")
    issue(lic_dir, vendor, "bad.lic", license_id="L-3", max_program_version="9.0.0")
    edit(lic_dir / "bad.lic", licensee="someone else")
    result = check(load_license_dir(lic_dir), "card-0", "0.1.0", date(2026, 1, 1), TODAY)
    assert result.allowed and result.license is not None and result.license.file == "new.lic"
    # 0.2.0: L-1 would allow it but has expired, L-3 is not genuine; L-2 is in force and says what to renew.
    verdict, reason = check_one(lic_dir, version="0.2.0")
    assert (verdict, reason) == (
        Verdict.VERSION_TOO_NEW,
        "licence L-2 for card card-0 allows program versions up to 0.1.0, not 0.2.0",
    )


def replace(path: Path, content: str) -> None:
    """Swap a file in atomically, as Kubernetes updates a mounted Secret."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def test_store_reloads_when_the_directory_changes(lic_dir: Path, vendor: Path) -> None:
    store = LicenseStore(lic_dir)
    assert [lic.file for lic in store.licenses()] == ["L-7.lic"]
    assert store.check("card-1", "0.1.0", date(2026, 1, 1), TODAY).verdict is Verdict.NO_LICENSE_FOR_CARD
    issue(lic_dir, vendor, "L-8.lic", license_id="L-8", card_id="card-1")
    assert store.check("card-1", "0.1.0", date(2026, 1, 1), TODAY).allowed
    signed = json.loads((lic_dir / "L-8.lic").read_text())
    signed["license"]["card_id"] = "card-2"
    replace(lic_dir / "L-8.lic", json.dumps(signed))
    assert store.check("card-2", "0.1.0", date(2026, 1, 1), TODAY).verdict is Verdict.BAD_SIGNATURE
    for path in lic_dir.glob("*.lic"):
        path.unlink()
    with pytest.raises(LicenseError, match=r"holds no \.lic files"):
        store.licenses()


# --- CLI ----------------------------------------------------------------------------------------

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that usage errors are not wrapped


def gharial(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_keygen_issue_verify_inspect(tmp_path: Path) -> None:
    keys, lic_dir = tmp_path / "keys", tmp_path / "lic"
    out = gharial("license", "keygen", "-o", keys)
    assert out.exit_code == 0, out.output
    assert stat.S_IMODE((keys / "vendor.key").stat().st_mode) == 0o600
    out = gharial("license", "keygen", "-o", keys)
    assert out.exit_code == 2 and "refusing to overwrite" in out.stderr

    lic_dir.mkdir()
    (lic_dir / "vendor.pub").write_bytes((keys / "vendor.pub").read_bytes())
    issue_args = [
        "license",
        "issue",
        "--key",
        keys / "vendor.key",
        "--card-id",
        "card-0",
        "--licensee",
        "ACME",
        "--max-program-version",
        "0.1.0",
        "--max-release-date",
        "2026-06-30",
        "--expires",
        "2099-12-31",
        "--license-id",
        "L-7",
    ]
    out = gharial(*issue_args, "-o", lic_dir / "L-7.lic")
    assert out.exit_code == 0, out.output
    assert "wrote" in out.stdout and "licence L-7 for card card-0" in out.stdout
    out = gharial(*issue_args, "-o", lic_dir / "L-7.lic")
    assert out.exit_code == 2 and "already exists; refusing to overwrite a licence" in out.stderr
    out = gharial(*issue_args, "-o", lic_dir / "L-7.json")
    assert out.exit_code == 2 and "must end in .lic" in out.stderr

    question = ["--card-id", "card-0", "--program-version", "0.1.0", "--release-date", "2026-06-30"]
    out = gharial("license", "verify", lic_dir, *question)
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("allowed: licence L-7 for card card-0 allows program version 0.1.0")
    out = gharial("license", "verify", lic_dir / "L-7.lic", *question)  # one file: vendor.pub beside it
    assert out.exit_code == 0, out.output
    out = gharial("license", "verify", lic_dir)
    assert out.exit_code == 0 and out.stdout.startswith(
        "valid: licence L-7 for card card-0 is valid through 2099-12-31"
    )

    out = gharial("license", "inspect", lic_dir / "L-7.lic", "--json", "--today", "2099-12-01")
    assert out.exit_code == 0, out.output
    info = json.loads(out.stdout)
    assert info["license_id"] == "L-7" and info["card_id"] == "card-0" and info["licensee"] == "ACME"
    assert info["signature_valid"] is True and info["state"] == "ALLOWED" and info["days_to_expiry"] == 30
    out = gharial("license", "inspect", lic_dir / "L-7.lic")
    assert out.exit_code == 0 and "signature    valid (key " in out.stdout


@pytest.mark.parametrize(
    ("args", "verdict", "reason"),
    [
        (
            ["--card-id", "card-9"],
            "NO_LICENSE_FOR_CARD",
            "no licence names card card-9 (licences name card-0)",
        ),
        (["--program-version", "0.2.0"], "VERSION_TOO_NEW", "allows program versions up to 0.1.0, not 0.2.0"),
        (["--release-date", "2026-07-01"], "RELEASE_TOO_NEW", "released up to 2026-06-30, not 2026-07-01"),
        (
            ["--today", "2027-01-02"],
            "EXPIRED",
            "licence L-7 for card card-0 expired on 2027-01-01 (today is 2027-01-02)",
        ),
    ],
)
def test_cli_verify_refusals(lic_dir: Path, args: list[str], verdict: str, reason: str) -> None:
    question = {
        "--card-id": "card-0",
        "--program-version": "0.1.0",
        "--release-date": "2026-01-01",
        "--today": "2026-03-01",
    }
    question.update(zip(args[::2], args[1::2], strict=True))
    out = gharial("license", "verify", lic_dir, *[part for pair in question.items() for part in pair])
    assert out.exit_code == 1
    assert out.stdout == ""
    assert out.stderr.startswith(f"refused ({verdict}): ") and reason in out.stderr


def test_cli_tampered_and_malformed(lic_dir: Path) -> None:
    edit(lic_dir / "L-7.lic", expires="2099-01-01")
    out = gharial("license", "verify", lic_dir / "L-7.lic")
    assert out.exit_code == 1
    assert "invalid (BAD_SIGNATURE): licence L-7 for card card-0 in L-7.lic has a bad signature" in out.stderr
    info = json.loads(gharial("license", "inspect", lic_dir / "L-7.lic", "--json").stdout)
    assert info["signature_valid"] is False and info["state"] == "BAD_SIGNATURE"
    (lic_dir / "junk.lic").write_text("junk")
    out = gharial("license", "verify", lic_dir)
    assert (
        out.exit_code == 1
        and "invalid (MALFORMED): licence file junk.lic is malformed: Invalid JSON" in out.stderr
    )


def test_cli_usage_errors(tmp_path: Path, lic_dir: Path, vendor: Path) -> None:
    out = gharial("license", "verify", lic_dir, "--card-id", "card-0")
    assert out.exit_code == 2 and "go together" in out.stderr
    out = gharial(
        "license",
        "verify",
        lic_dir,
        "--card-id",
        "card-0",
        "--program-version",
        "one",
        "--release-date",
        "2026-01-01",
    )
    assert out.exit_code == 2 and "'one' is not dot-separated numbers" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = gharial("license", "verify", empty)
    assert out.exit_code == 2 and f"licence directory {empty} holds no .lic files" in out.stderr
    out = gharial(
        "license",
        "issue",
        "--key",
        vendor,
        "--card-id",
        "c",
        "--max-program-version",
        "0.1",
        "--max-release-date",
        "2020-01-01",
        "--expires",
        "2020-01-01",
        "-o",
        tmp_path / "x.lic",
    )
    assert out.exit_code == 2 and "2020-01-01 is already past" in out.stderr


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("keygen", ["--out"]),
        (
            "issue",
            [
                "--key",
                "--card-id",
                "--max-program-version",
                "--max-release-date",
                "--expires",
                "--licensee",
                "--license-id",
                "--out",
            ],
        ),
        ("verify", ["--public-key", "--card-id", "--program-version", "--release-date", "--today"]),
        ("inspect", ["--public-key", "--json", "--today"]),
    ],
)
def test_cli_help_explains_every_flag(command: str, flags: list[str]) -> None:
    out = runner.invoke(app, ["license", command, "--help"])
    assert out.exit_code == 0
    for flag in flags:
        line = next(line for line in out.stdout.splitlines() if f" {flag} " in line)
        assert len(line.split(flag, 1)[1].strip(" │")) > 10, line  # the flag has a description


def test_cli_verify_reads_version_and_release_date_from_a_program(
    lic_dir: Path, tmp_path: Path, tiny_tokenizer_bytes: bytes
) -> None:
    from gharial.accelerator.compiler import compile_checkpoint

    from .conftest import emitting_model
    from .test_program import checkpoint_of

    program = tmp_path / "tiny.prog"
    compile_checkpoint(checkpoint_of(emitting_model(), tiny_tokenizer_bytes)).save(program)
    out = gharial(
        "license", "verify", lic_dir, "--card-id", "card-0", "--program", program, "--today", "2026-03-01"
    )
    assert out.exit_code == 1  # the program (released 2026-11-25) is newer than the licence allows
    assert "RELEASE_TOO_NEW" in out.stderr and "not 2026-11-25" in out.stderr
    program.write_bytes(program.read_bytes()[:100])
    out = gharial("license", "verify", lic_dir, "--card-id", "card-0", "--program", program)
    assert out.exit_code == 2 and "tiny.prog" in out.stderr
