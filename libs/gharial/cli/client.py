"""`gharial client`: stream an audio file to a gateway over the websocket API and print the
transcript as it arrives (the CAIMAN-ASR simple client)."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, TextIO
from urllib.parse import urlencode

import typer
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from gharial.audio import float_to_pcm16, load_audio
from gharial.gateway.framing import FRAME_BYTES, FRAME_SECONDS
from gharial.gateway.messages import STREAM_PATH, SUBPROTOCOL, StreamResponse
from gharial.gateway.params import DEFAULT_CONTENT_TYPE, SAMPLE_RATE

_CLEAR_LINE = "\r\x1b[K"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class LiveTranscript:
    """Prints final text as it arrives. On a terminal (`live`), the provisional text follows it,
    dimmed and rewritten in place on the last line; final text wraps at `width`."""

    def __init__(self, out: TextIO, live: bool, width: int) -> None:
        self.out = out
        self.live = live
        self.width = max(width, 20)
        self._line = ""  # final text on the current line
        self._printed = False

    def show(self, response: StreamResponse) -> None:
        text = response.alternatives[0].transcript if response.alternatives else ""
        final = not response.is_provisional
        if not self.live:
            if final and text:
                self.out.write(text if self._printed else text.lstrip())
                self._printed = True
                self.out.flush()
            return
        if final:
            self._line = (self._line + text).lstrip()
        while len(self._line) >= self.width:
            cut = self._line.rfind(" ", 1, self.width)
            cut = cut if cut > 0 else self.width - 1
            self.out.write(_CLEAR_LINE + self._line[:cut] + "\n")
            self._line = self._line[cut:].lstrip()
        provisional = "" if final else (text if self._line else text.lstrip())
        room = self.width - 1 - len(self._line)
        self.out.write(_CLEAR_LINE + self._line + _DIM + provisional[:room] + _RESET)
        self.out.flush()

    def finish(self) -> None:
        self.out.write((_CLEAR_LINE + self._line if self.live else "") + "\n")
        self.out.flush()


def _send_audio(ws: ClientConnection, pcm: bytes, realtime: bool) -> None:
    """60 ms frames, each sent once it would exist in a live recording (or at once), then EOS."""
    start = time.monotonic()
    try:
        for i, offset in enumerate(range(0, len(pcm), FRAME_BYTES)):
            if realtime:
                time.sleep(max(0.0, start + (i + 1) * FRAME_SECONDS - time.monotonic()))
            ws.send(pcm[offset : offset + FRAME_BYTES])
        ws.send(b"")
    except ConnectionClosed:
        pass  # the server closed early; the reader reports why


def client(
    audio: Annotated[
        Path, typer.Argument(help="audio file (WAV/FLAC/OGG, any rate; mixed to mono, resampled)")
    ],
    host: Annotated[str, typer.Option(help="gateway host")] = "localhost",
    port: Annotated[int, typer.Option(help="gateway port")] = 3030,
    alternatives: Annotated[
        int,
        typer.Option(min=1, help="alternatives to ask for (the best is shown)"),
    ] = 1,
    realtime: Annotated[
        bool, typer.Option("--realtime/--no-realtime", help="pace the audio in real time, like a live source")
    ] = True,
    api_key: Annotated[
        str | None, typer.Option(envvar="GHARIAL_API_KEY", help="API key, when the gateway requires one")
    ] = None,
) -> None:
    """Stream an audio file to a Gharial gateway and print its transcript live."""
    try:
        pcm = float_to_pcm16(load_audio(audio, SAMPLE_RATE))
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    query = urlencode({"content_type": DEFAULT_CONTENT_TYPE, "alternatives": alternatives})
    uri = f"ws://{host}:{port}{STREAM_PATH}?{query}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    transcript = LiveTranscript(sys.stdout, sys.stdout.isatty(), shutil.get_terminal_size().columns)
    try:
        with connect(uri, subprotocols=[Subprotocol(SUBPROTOCOL)], additional_headers=headers) as ws:
            sender = threading.Thread(target=_send_audio, args=(ws, pcm, realtime), daemon=True)
            sender.start()
            try:
                for message in ws:
                    transcript.show(StreamResponse.model_validate_json(message))
            except ConnectionClosed:
                pass  # an error close: reported below
            sender.join()
            code, reason = ws.close_code, ws.close_reason
    except (OSError, InvalidHandshake) as err:
        typer.echo(f"error: cannot stream to {uri}: {err}", err=True)
        raise typer.Exit(2) from err
    transcript.finish()
    if code != 1000:
        typer.echo(f"error: the gateway closed the stream with {code}: {reason}", err=True)
        raise typer.Exit(1)
