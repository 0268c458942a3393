"""Query parameters of `GET /asr/v0.1/stream` (spec: "Request Parameters"), validated into
`StreamParams`.

The documented parameters are `content_type`, `model`, `version`, `lang` and `alternatives`, plus
`api_key` (read by `gharial.gateway.auth`). Anything else, a repeated parameter, or a query string
that does not decode raises `ParamError`, and only that: the gateway closes the stream with a
reason starting "400".
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The only audio the transcribers take: 16 kHz mono little-endian 16-bit PCM (DESIGN §1).
MEDIA_TYPE = "audio/x-raw"
SAMPLE_FORMAT = "S16LE"
SAMPLE_RATE = 16000
CHANNELS = 1
DEFAULT_CONTENT_TYPE = f"{MEDIA_TYPE};format={SAMPLE_FORMAT};channels={CHANNELS};rate={SAMPLE_RATE}"

MAX_ALTERNATIVES = 10
API_KEY_PARAMETER = "api_key"
# Far more than a client needs; a bound keeps a hostile query string cheap to reject.
MAX_QUERY_FIELDS = 16
MAX_VALUE_CHARS = 256


class ParamError(ValueError):
    """The request's parameters are invalid; the message says which and why (→ "400 ...")."""


def parse_query(query_string: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs of a raw, percent-encoded query string (separator `&` only, so the
    `;` inside `content_type` needs no escaping)."""
    try:
        return parse_qsl(
            query_string.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except ValueError as err:  # UnicodeDecodeError included
        raise ParamError(f"query string does not decode: {err}") from None


def _content_type(value: str) -> str:
    """`value` checked against what the transcribers take, normalised to `DEFAULT_CONTENT_TYPE`.

    Raw audio needs its `format`, `rate` and `channels` spelled out (spec: "additional parameters
    must be provided").
    """
    media_type, *parameters = (part.strip() for part in value.split(";"))
    if media_type.lower() != MEDIA_TYPE:
        raise ValueError(f"{media_type!r} is not supported: only {MEDIA_TYPE} is")
    given: dict[str, str] = {}
    for parameter in parameters:
        name, equals, setting = (part.strip() for part in parameter.partition("="))
        if not equals or name in given:
            raise ValueError(f"{parameter!r} is not one name=value, or repeats a name")
        given[name] = setting
    expected = {"format": SAMPLE_FORMAT, "rate": str(SAMPLE_RATE), "channels": str(CHANNELS)}
    if unknown := sorted(given.keys() - expected.keys()):
        raise ValueError(f"unknown parameter {unknown[0]!r} (known: format, rate, channels)")
    if missing := [name for name in expected if name not in given]:
        raise ValueError(f"{MEDIA_TYPE} needs format, rate and channels; missing {', '.join(missing)}")
    for name, supported in expected.items():
        if given[name] != supported:
            raise ValueError(f"{name}={given[name]!r} is not supported: only {name}={supported} is")
    return DEFAULT_CONTENT_TYPE


class StreamParams(BaseModel):
    """A stream's validated parameters; defaults are what an absent parameter means."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Absent: inferred as the only supported type.
    content_type: str = DEFAULT_CONTENT_TYPE
    # Empty: the gateway's default model.
    model: str = Field("", max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$")
    # "latest" or a specific version id; empty: the worker's default (the latest).
    version: str = Field("", max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9._+-]*)?$")
    # BCP 47 tag such as "en-US"; empty: the model's language.
    lang: str = Field("", max_length=35, pattern=r"^([A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*)?$")
    alternatives: int = Field(1, ge=1, le=MAX_ALTERNATIVES)

    @field_validator("content_type", mode="before")
    @classmethod
    def _check_content_type(cls, value: Any) -> str:
        return _content_type(str(value))

    @field_validator("alternatives", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """Decimal digits only: pydantic alone would also take "1.0", " 2" or "٣"."""
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError(f"must be an integer from 1 to {MAX_ALTERNATIVES}, got {value[:20]!r}")
        return value

    @classmethod
    def from_query(cls, pairs: list[tuple[str, str]]) -> StreamParams:
        """Validate decoded query pairs; `ParamError` names the first problem."""
        given: dict[str, str] = {}
        for name, value in pairs:
            if name in given:
                raise ParamError(f"parameter {name[:40]!r} is given more than once")
            if len(value) > MAX_VALUE_CHARS:
                raise ParamError(f"parameter {name[:40]!r} is longer than {MAX_VALUE_CHARS} characters")
            given[name] = value
        given.pop(API_KEY_PARAMETER, None)
        if unknown := sorted(given.keys() - cls.model_fields.keys()):
            known = ", ".join(cls.model_fields)
            raise ParamError(f"unknown parameter {unknown[0][:40]!r} (known: {known})")
        try:
            return cls.model_validate(given)
        except ValidationError as err:
            first = err.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            raise ParamError(f"{first['loc'][0]}: {message}") from None
