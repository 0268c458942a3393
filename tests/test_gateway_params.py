"""Query parameters of the stream endpoint: every documented one, and hostile query strings."""

from __future__ import annotations

import contextlib
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gharial.gateway.auth import ApiKeys, hash_key, presented_key
from gharial.gateway.closing import CloseCode, StreamClosed
from gharial.gateway.params import DEFAULT_CONTENT_TYPE, ParamError, StreamParams, parse_query


def params(query: str | bytes) -> StreamParams:
    return StreamParams.from_query(parse_query(query.encode() if isinstance(query, str) else query))


def test_defaults_when_absent() -> None:
    assert params("") == StreamParams(
        content_type=DEFAULT_CONTENT_TYPE, model="", version="", lang="", alternatives=1
    )


def test_every_documented_parameter() -> None:
    query = urlencode(
        {
            "content_type": "audio/x-raw;format=S16LE;channels=1;rate=16000",
            "model": "en-small",
            "version": "latest",
            "lang": "en-US",
            "alternatives": "3",
        }
    )
    assert params(query) == StreamParams(model="en-small", version="latest", lang="en-US", alternatives=3)


@pytest.mark.parametrize(
    "content_type",
    [
        "audio/x-raw;format=S16LE;channels=1;rate=16000",
        "audio/x-raw;rate=16000;channels=1;format=S16LE",
        "AUDIO/X-RAW; format=S16LE; channels=1; rate=16000",
    ],
)
def test_content_type_accepted(content_type: str) -> None:
    assert params("content_type=" + quote(content_type)).content_type == DEFAULT_CONTENT_TYPE


def test_content_type_unescaped_semicolons_are_fine() -> None:
    assert (
        params("content_type=audio/x-raw;format=S16LE;channels=1;rate=16000&alternatives=2").alternatives == 2
    )


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("audio/wav", "only audio/x-raw"),
        ("audio/x-raw", "missing format, rate, channels"),
        ("audio/x-raw;format=S16LE;channels=1", "missing rate"),
        ("audio/x-raw;format=F32LE;channels=1;rate=16000", "format='F32LE'"),
        ("audio/x-raw;format=S16LE;channels=1;rate=8000", "rate='8000'"),
        ("audio/x-raw;format=S16LE;channels=2;rate=16000", "channels='2'"),
        ("audio/x-raw;format=S16LE;channels=1;rate=16000;layout=interleaved", "unknown parameter 'layout'"),
        ("audio/x-raw;format=S16LE;format=S16LE;channels=1;rate=16000", "repeats"),
        ("audio/x-raw;format", "not one name=value"),
        ("", "only audio/x-raw"),
    ],
)
def test_content_type_rejected(content_type: str, message: str) -> None:
    with pytest.raises(ParamError, match="content_type") as raised:
        params("content_type=" + quote(content_type))
    assert message in str(raised.value)


@pytest.mark.parametrize("value", ["0", "11", "-1", "x", "", "1.0", " 2", "٣", "99999999999999999999"])
def test_alternatives_rejected(value: str) -> None:
    with pytest.raises(ParamError, match=r"^alternatives: "):
        params("alternatives=" + quote(value))


@pytest.mark.parametrize("value", ["1", "10", "05"])
def test_alternatives_accepted(value: str) -> None:
    assert params("alternatives=" + value).alternatives == int(value)


@pytest.mark.parametrize(
    "query",
    [
        "model=en%20small",
        "model=-x",
        "model=" + "m" * 65,
        "version=..%2F",
        "lang=e",
        "lang=en_US",
        "lang=en-",
    ],
)
def test_model_version_lang_rejected(query: str) -> None:
    with pytest.raises(ParamError, match=r"^(model|version|lang): "):
        params(query)


def test_unknown_and_repeated_parameters_rejected() -> None:
    with pytest.raises(ParamError, match="unknown parameter 'modle'"):
        params("modle=en-small")
    with pytest.raises(ParamError, match="more than once"):
        params("model=a&model=b")


def test_api_key_is_not_a_stream_parameter() -> None:
    assert params("api_key=secret&model=m").model == "m"


def test_undecodable_and_oversized_queries_rejected() -> None:
    with pytest.raises(ParamError, match="does not decode"):
        params("model=%ff")
    with pytest.raises(ParamError, match="does not decode"):
        params(b"model=\xff")
    with pytest.raises(ParamError, match="does not decode"):
        params("&".join(f"a{i}=1" for i in range(100)))
    with pytest.raises(ParamError, match="longer than"):
        params("lang=" + "a" * 1000)


@given(st.binary(max_size=300))
def test_hostile_query_strings_raise_only_param_error(query: bytes) -> None:
    with contextlib.suppress(ParamError):
        params(query)


@given(
    st.dictionaries(st.sampled_from(["content_type", "model", "version", "lang", "alternatives"]), st.text())
)
def test_hostile_values_raise_only_param_error(values: dict[str, str]) -> None:
    with contextlib.suppress(ParamError):
        params(urlencode(values))


def test_api_keys() -> None:
    keys = ApiKeys([hash_key("k1"), hash_key("k2").upper()])
    keys.check({"authorization": "Bearer k1"}, [])
    keys.check({"x-api-key": "k2"}, [])
    keys.check({}, [("api_key", "k1")])
    with pytest.raises(StreamClosed, match=r"^401 API key required") as raised:
        keys.check({}, [])
    assert raised.value.code == 1008
    with pytest.raises(StreamClosed, match=r"^401 API key not accepted"):
        keys.check({"authorization": "Bearer nope"}, [("api_key", "k1")])  # the header wins
    ApiKeys([]).check({}, [])  # off
    with pytest.raises(ValueError, match="SHA-256"):
        ApiKeys(["k1"])
    assert presented_key({"authorization": "Basic abc"}, []) is None


def test_close_reason_fits_a_close_frame() -> None:
    closed = StreamClosed(CloseCode.POLICY_VIOLATION, 400, "é" * 200)
    assert closed.reason.startswith("400 ") and len(closed.reason.encode()) <= 123
