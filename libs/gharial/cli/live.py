"""`gharial live`: transcribe the microphone live (the CAIMAN-ASR live demo client).

sounddevice (and the PortAudio library under it) is an optional extra, `gharial[live]`: servers and
CI have no microphone, so it is imported only when this command runs."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
from types import ModuleType
from typing import Annotated
from urllib.parse import urlencode

import typer
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from gharial.cli.client import LiveTranscript
from gharial.gateway.framing import FRAME_SAMPLES
from gharial.gateway.messages import STREAM_PATH, SUBPROTOCOL, StreamResponse
from gharial.gateway.params import DEFAULT_CONTENT_TYPE, SAMPLE_RATE


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except ImportError as err:
        typer.echo("error: `gharial live` needs sounddevice: pip install 'gharial[live]'", err=True)
        raise typer.Exit(2) from err
    except OSError as err:  # sounddevice is there but the PortAudio library is not
        typer.echo(
            f"error: {err}; install PortAudio (Debian/Ubuntu: apt-get install libportaudio2)", err=True
        )
        raise typer.Exit(2) from err
    return sounddevice


def _send_microphone(
    ws: ClientConnection, sd: ModuleType, device: int | None, stop: threading.Event, failure: list[str]
) -> None:
    """60 ms blocks of 16 kHz mono S16LE as the microphone delivers them, then end of stream. A
    microphone error ends the stream too and is kept in `failure` for the main thread to report."""
    try:
        with sd.RawInputStream(
            samplerate=SAMPLE_RATE, channels=1, dtype="int16", blocksize=FRAME_SAMPLES, device=device
        ) as microphone:
            while not stop.is_set():
                block, _overflowed = microphone.read(FRAME_SAMPLES)
                ws.send(bytes(block))
    except sd.PortAudioError as err:
        failure.append(str(err))
    except ConnectionClosed:
        return  # the server closed first; the reader reports why
    with contextlib.suppress(ConnectionClosed):
        ws.send(b"")


def _show(ws: ClientConnection, transcript: LiveTranscript) -> None:
    try:
        for message in ws:
            transcript.show(StreamResponse.model_validate_json(message))
    except ConnectionClosed:
        pass  # an error close: reported by the caller


def live(
    list_devices: Annotated[bool, typer.Option(help="list the audio devices and exit")] = False,
    input_device: Annotated[
        int | None, typer.Option(help="input device number from --list-devices (default: the system's)")
    ] = None,
    host: Annotated[str, typer.Option(help="gateway host")] = "localhost",
    port: Annotated[int, typer.Option(help="gateway port")] = 3030,
    api_key: Annotated[
        str | None, typer.Option(envvar="GHARIAL_API_KEY", help="API key, when the gateway requires one")
    ] = None,
) -> None:
    """Stream the microphone to a Gharial gateway and print the transcript live; Ctrl-C stops."""
    sd = _sounddevice()
    if list_devices:
        devices = sd.query_devices()
        typer.echo(str(devices) if len(devices) else "no audio devices found")
        return
    uri = f"ws://{host}:{port}{STREAM_PATH}?{urlencode({'content_type': DEFAULT_CONTENT_TYPE})}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    transcript = LiveTranscript(sys.stdout, sys.stdout.isatty(), shutil.get_terminal_size().columns)
    stop = threading.Event()
    failure: list[str] = []
    try:
        with connect(uri, subprotocols=[Subprotocol(SUBPROTOCOL)], additional_headers=headers) as ws:
            sender = threading.Thread(
                target=_send_microphone, args=(ws, sd, input_device, stop, failure), daemon=True
            )
            sender.start()
            try:
                _show(ws, transcript)
            except KeyboardInterrupt:
                stop.set()
                _show(ws, transcript)  # the rest, up to the final response and the Close
            sender.join()
            code, reason = ws.close_code, ws.close_reason
    except (OSError, InvalidHandshake) as err:
        typer.echo(f"error: cannot stream to {uri}: {err}", err=True)
        raise typer.Exit(2) from err
    transcript.finish()
    if failure:
        typer.echo(f"error: microphone: {failure[0]} (try --list-devices and --input-device)", err=True)
        raise typer.Exit(2)
    if code != 1000:
        typer.echo(f"error: the gateway closed the stream with {code}: {reason}", err=True)
        raise typer.Exit(1)
