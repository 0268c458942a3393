"""`gharial license ...`: make vendor keys, issue licences, verify and inspect them (DESIGN §5).

`keygen` and `issue` are vendor tools: they are the only commands that touch the private key, and
they run on the vendor's machine, never in a container or service. `verify` and `inspect` need only
the public key (vendor.pub), which ships in every licence directory.

Exit status: 0 allowed/valid, 1 refused/invalid (with the reason on stderr), 2 unusable input.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated
from uuid import uuid4

import typer

from gharial.accelerator.program import Program, ProgramError
from gharial.licensing import (
    License,
    LicenseBody,
    LicenseError,
    Verdict,
    check,
    default_public_key,
    generate_keys,
    key_id,
    load_license_dir,
    load_license_file,
    load_private_key,
    load_public_key,
    parse_version,
    sign_license,
    utc_today,
    write_license,
)

app = typer.Typer(help="Vendor keys and per-card licences: issue, verify, inspect.", no_args_is_help=True)

DATE_FORMATS = ["%Y-%m-%d"]


def _version(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_version(value)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    return value


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


PublicKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        help="the vendor's public key (PEM); default: vendor.pub in the licence directory "
        "(or beside the licence file)",
        dir_okay=False,
    ),
]
TodayOption = Annotated[
    datetime | None,
    typer.Option(
        formats=DATE_FORMATS, metavar="YYYY-MM-DD", help="judge expiry as of this day instead of today (UTC)"
    ),
]


def _today(today: datetime | None) -> date:
    return today.date() if today is not None else utc_today()


@app.command()
def keygen(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            help="directory for vendor.key (private, mode 0600) and vendor.pub",
        ),
    ],
) -> None:
    """Make a new vendor key pair. Keep vendor.key offline; ship vendor.pub with the licences."""
    try:
        private_path, public_path = generate_keys(out)
    except LicenseError as err:
        raise _fail(err) from err
    typer.echo(f"wrote {private_path} (private: never copy it into a container or service)")
    typer.echo(f"wrote {public_path} (key {key_id(load_public_key(public_path))})")


@app.command()
def issue(
    key: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="the vendor's private key (vendor.key)")
    ],
    card_id: Annotated[str, typer.Option(help="the unique ID of the card the licence is for")],
    max_program_version: Annotated[
        str, typer.Option(callback=_version, help="the highest program version allowed, e.g. 0.1.0")
    ],
    max_release_date: Annotated[
        datetime,
        typer.Option(
            formats=DATE_FORMATS,
            metavar="YYYY-MM-DD",
            help="the latest program release date allowed",
        ),
    ],
    expires: Annotated[
        datetime,
        typer.Option(formats=DATE_FORMATS, metavar="YYYY-MM-DD", help="the last day the licence is valid"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="licence file to write (*.lic)")],
    licensee: Annotated[str, typer.Option(help="who the licence is issued to")] = "",
    license_id: Annotated[
        str | None, typer.Option(help="the licence's ID; default L-<8 random hex digits>")
    ] = None,
) -> None:
    """Sign a licence allowing one card to run programs up to a version and release date."""
    if expires.date() < utc_today():
        raise typer.BadParameter(f"{expires.date()} is already past", param_hint="--expires")
    try:
        body = LicenseBody(
            license_id=license_id or f"L-{uuid4().hex[:8]}",
            card_id=card_id,
            licensee=licensee,
            max_program_version=max_program_version,
            max_release_date=max_release_date.date(),
            expires=expires.date(),
            issued=datetime.now(UTC).replace(microsecond=0),
        )
        signed = sign_license(body, load_private_key(key))
        write_license(out, signed)
    except (LicenseError, ValueError) as err:
        raise _fail(err) from err
    typer.echo(
        f"wrote {out}: {body.name}, programs up to {body.max_program_version} released up to "
        f"{body.max_release_date}, valid through {body.expires}, signed by key {signed.key_id}"
    )


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(exists=True, help="a licence file (*.lic) or a licence directory")],
    public_key: PublicKeyOption = None,
    card_id: Annotated[
        str | None, typer.Option(help="ask whether this card may run the program (needs the two below)")
    ] = None,
    program_version: Annotated[
        str | None, typer.Option(callback=_version, help="the program's version, e.g. 0.1.0")
    ] = None,
    release_date: Annotated[
        datetime | None,
        typer.Option(formats=DATE_FORMATS, metavar="YYYY-MM-DD", help="the program's release date"),
    ] = None,
    program: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="a program file: its version and release date replace the two above",
        ),
    ] = None,
    today: TodayOption = None,
) -> None:
    """Check licences' signatures and expiry, or whether they allow a card to run a program.

    Given a card (--card-id) and a program (--program, or --program-version/--release-date) it answers
    that question: exit 0 and "allowed: ..." when a licence allows it, else exit 1 and the reason.
    Without them it checks every licence's signature and expiry: exit 1 if any is not valid."""
    if program is not None:
        try:
            info = Program.load(program).info()
        except ProgramError as err:
            raise _fail(err) from err
        program_version = info.program_version
        release_date = datetime.fromisoformat(info.release_date)
    question = (card_id, program_version, release_date)
    if any(part is not None for part in question) and None in question:
        raise typer.BadParameter(
            "--card-id and --program (or --program-version and --release-date) go together"
        )
    key_path = public_key or default_public_key(path)
    try:
        if path.is_dir():
            licenses = load_license_dir(path, key_path)
        else:
            licenses = [load_license_file(path, load_public_key(key_path))]
    except LicenseError as err:
        raise _fail(err) from err
    day = _today(today)
    if card_id is None or program_version is None or release_date is None:
        _report_states(licenses, day)
        return
    result = check(licenses, card_id, program_version, release_date.date(), day)
    if not result.allowed:
        typer.echo(f"refused ({result.verdict}): {result.reason}", err=True)
        raise typer.Exit(1)
    typer.echo(f"allowed: {result.reason}")


def _report_states(licenses: list[License], day: date) -> None:
    """One line per licence; exit 1 if any is not valid today."""
    invalid = 0
    for lic in licenses:
        verdict, reason = lic.state(day)
        if verdict is Verdict.ALLOWED:
            typer.echo(f"valid: {reason}")
        else:
            invalid += 1
            typer.echo(f"invalid ({verdict}): {reason}", err=True)
    if invalid:
        raise typer.Exit(1)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the licence file (*.lic)")],
    public_key: PublicKeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
    today: TodayOption = None,
) -> None:
    """Print a licence's fields, whether its signature verifies and whether it is valid today."""
    try:
        lic = load_license_file(file, load_public_key(public_key or default_public_key(file)))
    except LicenseError as err:
        raise _fail(err) from err
    summary = lic.summary(_today(today))
    if as_json:
        extra = {"key_id": lic.key_id, "signature_valid": lic.signature_valid}
        typer.echo(json.dumps({**summary.model_dump(mode="json"), **extra}))
        return
    signature = f"valid (key {lic.key_id})" if lic.signature_valid else "NOT VALID"
    rows = [
        ("licence", summary.license_id),
        ("card", summary.card_id),
        ("licensee", summary.licensee),
        ("max program", summary.max_program_version),
        ("max release", summary.max_release_date),
        ("expires", summary.expires),
        ("days left", "" if summary.days_to_expiry is None else str(summary.days_to_expiry)),
        ("issued", summary.issued),
        ("signature", signature),
        ("state", f"{summary.state}: {summary.state_reason}"),
    ]
    typer.echo(f"{file}")
    typer.echo("\n".join(f"  {name:<12} {value}" for name, value in rows))
