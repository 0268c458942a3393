"""Optional API keys for the stream endpoint.

The gateway stores only SHA-256 hashes of the keys it accepts (flags or a file), so its
configuration does not leak them. A client gives its key as ``Authorization: Bearer KEY``, as
``X-API-Key: KEY``, or — for browsers, which cannot set headers on a websocket — as the query
parameter ``api_key``. With no hashes configured, auth is off.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from gharial.gateway.closing import unauthorized
from gharial.gateway.params import API_KEY_PARAMETER

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The form a key is stored in: SHA-256 of its UTF-8 bytes, lower-case hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_hashes(path: Path) -> list[str]:
    """One hash per line; blank lines and lines starting with '#' are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class ApiKeys:
    def __init__(self, hashes: Iterable[str]) -> None:
        self._hashes = frozenset(h.lower() for h in hashes)
        if bad := [h for h in self._hashes if not _SHA256_HEX.match(h)]:
            raise ValueError(f"not a SHA-256 hex digest: {bad[0][:16]}...")

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def check(self, headers: Mapping[str, str], query: list[tuple[str, str]]) -> None:
        """Raise a "401" `StreamClosed` unless auth is off or a configured key was given.

        Comparing hashes needs no constant-time compare: timing can only reveal a hash prefix,
        which does not help to find a key."""
        if not self.enabled:
            return
        key = presented_key(headers, query)
        if key is None:
            raise unauthorized("API key required: Authorization: Bearer KEY, X-API-Key or api_key=")
        if hash_key(key) not in self._hashes:
            raise unauthorized("API key not accepted")


def presented_key(headers: Mapping[str, str], query: list[tuple[str, str]]) -> str | None:
    """The key the client gave, from the first of: Authorization, X-API-Key, `api_key`."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if key := headers.get("x-api-key", "").strip():
        return key
    return next((value for name, value in query if name == API_KEY_PARAMETER), None)
