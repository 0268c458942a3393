"""How a stream ends with an error: a websocket Close frame whose reason starts with a status.

The spec's error table gives HTTP-like statuses (400: invalid parameters, 503: no capacity) "in
the body" of the Close frame. The gateway accepts the websocket first and then closes it with a code
and a reason such as ``400 alternatives: must be an integer from 1 to 10``: browsers hide the
status and body of a refused handshake from scripts, but hand them the Close frame's code and reason.
"""

from __future__ import annotations

from enum import IntEnum

# RFC 6455 §5.5.1: a Close frame's body is at most 125 bytes, 2 of them the code.
MAX_REASON_BYTES = 123


class CloseCode(IntEnum):
    """RFC 6455 §7.4.1 and the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class StreamClosed(Exception):
    """Ends a stream with a Close frame: `code`, and a reason made of `status` and `details`."""

    def __init__(self, code: CloseCode, status: int, details: str) -> None:
        super().__init__(f"{status} {details}")
        self.code = code
        self.status = status
        self.details = details

    @property
    def reason(self) -> str:
        """``"<status> <details>"``, cut to fit a Close frame (at a character boundary)."""
        return str(self).encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def bad_request(details: str) -> StreamClosed:
    return StreamClosed(CloseCode.POLICY_VIOLATION, 400, details)


def unauthorized(details: str) -> StreamClosed:
    return StreamClosed(CloseCode.POLICY_VIOLATION, 401, details)


def unavailable(details: str) -> StreamClosed:
    return StreamClosed(CloseCode.TRY_AGAIN_LATER, 503, details)
