"""The demo page (`/` on the gateway) in a real browser: Debian's Chromium driven by Playwright,
against a LocalStack with the cpu backend.

The microphone is Chromium's fake capture device playing a real recording with silence around it;
the file goes in through the page's file input. Every websocket frame the page sends is captured.
The page's transcript must be the right words (the recording's own transcript, compared after
Whisper's English normaliser) and equal the stack's own transcript of exactly the audio the page
sent, obtained through the websockets client the end-to-end tests use. The recording is a
training-set take the bundled model transcribes exactly (tests/assets/SOURCES.md says why no
held-out one can serve). Screenshot: tests/artifacts/demo-page.png, and docs/demo-page.png with
GHARIAL_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from playwright.sync_api import Browser, ConsoleMessage, Page, WebSocket, expect, sync_playwright

from gharial.audio import float_to_pcm16, load_audio, resample
from gharial.gateway.framing import FRAME_BYTES
from gharial.validation import normalize_for_wer
from tests.test_end_to_end import Stack, running_stack

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "tests" / "artifacts" / "demo-page.png"
DOCS_SCREENSHOT = ROOT / "docs" / "demo-page.png"
ASSETS = ROOT / "tests" / "assets"
TIMEOUT_S = 60
LEAD_S, TAIL_S = 0.5, 2.0  # silence around the speech in the WAV

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


@dataclass
class Speech:
    """A recording with LEAD_S of silence before and TAIL_S after, as a 16 kHz mono 16-bit WAV;
    its samples as S16LE; and what is said in it."""

    wav: Path
    pcm: bytes
    transcript: str

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / 16000

    def is_said_in(self, text: str) -> bool:
        return normalize_for_wer(text) == normalize_for_wer(self.transcript)


@dataclass
class DemoPage:
    """An open page, the audio frames it sent on its websockets, and its console errors."""

    page: Page
    sent: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    # Waits go through locators: the page's Content-Security-Policy forbids the `eval` that
    # Playwright's wait_for_function needs, and the tests keep that policy on.
    def open(self, base_url: str, query: str = "") -> None:
        self.page.goto(f"{base_url}/{query}")
        expect(self.page.locator("#endpoint")).not_to_be_empty()

    def state(self) -> str:
        return str(self.page.get_attribute("body", "data-state"))

    def wait_until_finished(self) -> str:
        body = self.page.locator("body")
        expect(body).to_have_attribute("data-state", re.compile("^(done|error)$"), timeout=TIMEOUT_S * 1000)
        return self.state()

    def wait_for_frames(self, frames: int) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while int(self.text("#frames")) < frames:
            assert time.monotonic() < deadline, f"only {self.text('#frames')} frames sent"
            self.page.wait_for_timeout(100)

    def text(self, selector: str) -> str:
        return str(self.page.text_content(selector))

    def screenshot(self) -> None:
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=ARTIFACT, full_page=True)
        if os.environ.get("GHARIAL_UPDATE_SCREENSHOT") == "1":
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ARTIFACT, DOCS_SCREENSHOT)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    """The real recording in tests/assets, padded with silence: Chromium's fake microphone loops
    the file, and the silence lets the microphone test stop between the speech and its repeat."""
    (entry,) = json.loads((ASSETS / "manifest.json").read_text())
    audio = load_audio(ASSETS / entry["files"][0]["fname"])
    padded = torch.cat([torch.zeros(int(LEAD_S * 16000)), audio, torch.zeros(int(TAIL_S * 16000))])
    pcm = float_to_pcm16(padded)
    wav = tmp_path_factory.mktemp("speech") / f"{entry['id']}.wav"
    soundfile.write(wav, np.frombuffer(pcm, dtype="<i2"), 16000, subtype="PCM_16")
    return Speech(wav, pcm, entry["transcript"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("demo"), cards=1, backend="cpu") as stack:
        yield stack


@pytest.fixture(scope="module")
def browser(speech: Speech) -> Iterator[Browser]:
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",  # grants the microphone without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech.wav}",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield browser
        browser.close()


@pytest.fixture
def demo(browser: Browser) -> Iterator[DemoPage]:
    context = browser.new_context(viewport={"width": 900, "height": 760})
    demo = DemoPage(context.new_page())

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            demo.errors.append(message.text)

    def on_websocket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: demo.sent.append(payload) if isinstance(payload, bytes) else None)

    demo.page.on("console", on_console)
    demo.page.on("pageerror", lambda error: demo.errors.append(str(error)))
    demo.page.on("websocket", on_websocket)
    yield demo
    context.close()


def base_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.port}"


def reference(stack: Stack, pcm: bytes) -> str:
    """The stack's transcript of `pcm`, from a thread of its own: Playwright's sync API keeps an
    event loop marked running on this one, so `asyncio.run` cannot run here."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(stack.reference, pcm).result().strip()


def sent_audio(demo: DemoPage) -> bytes:
    """The audio of the page's stream: whole 60 ms frames, then a last, partial one. (Chromium does
    not report the zero-length EOS frame; state "done" shows it was sent, as the gateway closes
    with 1000 only after answering it.)"""
    frames = demo.sent
    assert frames and all(len(f) == FRAME_BYTES for f in frames[:-1])
    assert 0 < len(frames[-1]) <= FRAME_BYTES
    return b"".join(frames)


def assert_stream_shown(demo: DemoPage, frames: int) -> None:
    assert int(demo.text("#frames")) == frames > 0
    assert float(demo.text("#p99")) >= float(demo.text("#p50")) > 0
    assert demo.text("#provisional") == ""
    assert demo.page.is_hidden("#error")


def test_page_loads_its_local_files_without_console_errors(demo: DemoPage, stack: Stack) -> None:
    requested: list[str] = []
    demo.page.on("request", lambda request: requested.append(request.url))
    demo.open(base_url(stack))
    assert demo.state() == "idle"
    assert demo.page.title().startswith("Gharial")
    endpoint = demo.text("#endpoint")
    content_type = "audio/x-raw;format=S16LE;channels=1;rate=16000"
    assert endpoint == f"ws://127.0.0.1:{stack.port}/asr/v0.1/stream?content_type={content_type}"
    assert {url.split("/")[2] for url in requested} == {f"127.0.0.1:{stack.port}"}
    assert demo.page.get_attribute("#chart", "aria-label")
    assert demo.page.get_by_label("Stream an audio file").count() == 1
    assert demo.errors == []


def test_file_is_streamed_and_transcribed_right(demo: DemoPage, stack: Stack, speech: Speech) -> None:
    demo.open(base_url(stack))
    demo.page.set_input_files("#file", speech.wav)
    assert demo.wait_until_finished() == "done", demo.text("#error")
    audio = sent_audio(demo)
    # Decoded at 16 kHz: the file's own samples, up to 1 LSB (Chromium scales positive 16-bit
    # samples by 1/32767 and negative ones by 1/32768).
    difference = np.frombuffer(audio, dtype="<i2") - np.frombuffer(speech.pcm, dtype="<i2").astype(int)
    assert len(audio) == len(speech.pcm) and np.abs(difference).max() <= 1
    text = demo.text("#final")
    assert speech.is_said_in(text), f"page shows {text!r}, the speaker said {speech.transcript!r}"
    assert text == reference(stack, audio)
    assert_stream_shown(demo, frames=len(demo.sent))
    demo.screenshot()
    assert demo.errors == []


def test_microphone_is_streamed_and_transcribed_right(demo: DemoPage, stack: Stack, speech: Speech) -> None:
    demo.open(base_url(stack))
    demo.page.click("#mic")
    chart = demo.page.locator("#chart")
    demo.wait_for_frames(15)
    early = chart.screenshot()
    demo.wait_for_frames(40)
    assert chart.screenshot() != early, "the latency chart did not move while streaming"
    # Stop 1 s into the trailing silence: the speech is over, and the loop's repeat of it is not
    # reached before the stop takes effect.
    demo.wait_for_frames(int((speech.seconds - TAIL_S + 1.0) / 0.06))
    assert demo.state() == "streaming"
    demo.page.click("#mic")  # stop: the last partial frame, then the EOS
    assert demo.wait_until_finished() == "done", demo.text("#error")
    audio = sent_audio(demo)
    peak = np.abs(np.frombuffer(audio, dtype="<i2")).max()
    assert peak > 1000, "the fake microphone sent silence"
    text = demo.text("#final")
    assert speech.is_said_in(text), f"page shows {text!r}, the speaker said {speech.transcript!r}"
    assert text == reference(stack, audio)
    assert_stream_shown(demo, frames=len(demo.sent))
    assert demo.errors == []


def test_bad_query_shows_the_error_state_with_the_close_reason(
    demo: DemoPage, stack: Stack, speech: Speech
) -> None:
    demo.open(base_url(stack), "?model=nonexistent")
    assert "model=nonexistent" in demo.text("#endpoint")
    demo.page.set_input_files("#file", speech.wav)
    assert demo.wait_until_finished() == "error"
    message = demo.text("#error")
    assert demo.page.is_visible("#error")
    assert "1008" in message and '"400 ' in message, message
    assert demo.text("#final") == ""


def test_browser_resampler_matches_gharial_audio(demo: DemoPage, stack: Stack) -> None:
    """The worklet's resampler (48 kHz → 16 kHz, fed in uneven blocks) against the Python one."""
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(24000)).astype(np.float32)
    demo.open(base_url(stack))
    out = demo.page.evaluate(
        """async (samples) => {
            const { Resampler } = await import("/static/resampler.js");
            const resampler = new Resampler(48000);
            const out = [];
            const emit = (v) => out.push(v);
            for (let i = 0, n = 1; i < samples.length; i += n, n = (n * 7 + 3) % 1000 + 1) {
                resampler.push(Float32Array.from(samples.slice(i, i + n)), emit);
            }
            resampler.flush(emit);
            return out;
        }""",
        audio.tolist(),
    )
    expected = resample(torch.from_numpy(audio), 48000, 16000).numpy()
    assert len(out) == len(expected)
    assert np.abs(np.array(out) - expected).max() < 1e-5
