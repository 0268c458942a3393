// The demo page: the microphone, or an audio file in real time, as 60 ms frames of 16 kHz mono
// S16LE to the gateway's stream endpoint; shows the transcript (final text, then the provisional
// tail) and each response's latency. The gateway answers every 60 ms frame once, in order, so
// response k belongs to frame k: its latency is the time from sending frame k to receiving it.

import { TARGET_RATE, toS16 } from "./resampler.js";

const FRAME_SAMPLES = 960; // 60 ms at 16 kHz: 1920 bytes
const FRAME_MS = 60;
const STREAM_PATH = "/asr/v0.1/stream";
const SUBPROTOCOL = "stream.asr.api.myrtle.ai";
const CONTENT_TYPE = "audio/x-raw;format=S16LE;channels=1;rate=16000";
// The documented parameters the page forwards from its own query string (e.g. /?alternatives=3).
const FORWARDED = ["model", "version", "lang", "alternatives", "api_key"];
const CHART_POINTS = 100; // 6 s

const ui = Object.fromEntries(
  ["mic", "file", "status", "error", "final", "provisional", "latency", "p50", "p99", "frames", "chart",
    "endpoint"].map((id) => [id, document.getElementById(id)]),
);

function streamUrl() {
  const page = new URLSearchParams(location.search);
  const query = new URLSearchParams({ content_type: CONTENT_TYPE });
  for (const name of FORWARDED) if (page.has(name)) query.set(name, page.get(name));
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${STREAM_PATH}?${query}`;
}

// The stream in progress: null when idle, done or failed.
let stream = null;

function setState(state, message) {
  document.body.dataset.state = state;
  ui.status.textContent = message;
  const busy = state === "connecting" || state === "streaming";
  ui.mic.textContent = busy ? "Stop" : "Start microphone";
  ui.file.disabled = busy;
}

// Ends the stream in progress from this side, whatever its state.
function drop() {
  if (!stream) return;
  const { ws, source } = stream;
  stream = null;
  source.release();
  if (ws.readyState <= WebSocket.OPEN) ws.close();
}

function fail(message) {
  drop();
  ui.error.textContent = message;
  ui.error.hidden = false;
  setState("error", "Error");
}

// Opens the websocket and runs `source` over it: source.start() once it is open, source.stop()
// when the user stops early, source.release() when the stream is over whatever the reason.
function open(source) {
  const ws = new WebSocket(streamUrl(), SUBPROTOCOL);
  ws.binaryType = "arraybuffer";
  stream = { ws, source, sentAt: [], latencies: [], received: 0, finalText: "", ended: false };
  for (const el of [ui.final, ui.provisional]) el.textContent = "";
  for (const el of [ui.latency, ui.p50, ui.p99]) el.textContent = "–";
  ui.frames.textContent = "0";
  drawChart([]);
  ws.onopen = () => {
    setState("streaming", "Streaming");
    source.start();
  };
  ws.onmessage = (event) => {
    if (stream?.ws === ws) receive(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (stream?.ws !== ws) return; // already failed or cancelled
    const { ended, received } = stream;
    stream = null;
    source.release();
    if (event.code === 1000 && ended) setState("done", `Done: ${received} responses`);
    else fail(closeMessage(event));
  };
}

function closeMessage({ code, reason }) {
  if (code === 1006) return `The connection to ${STREAM_PATH} failed or dropped (code 1006, no reason).`;
  return `The server closed the stream: code ${code}${reason ? `, "${reason}"` : ""}.`;
}

function sendAudio(pcm) {
  if (!stream || stream.ended || stream.ws.readyState !== WebSocket.OPEN || pcm.byteLength === 0) return;
  stream.sentAt.push(performance.now());
  stream.ws.send(pcm);
  ui.frames.textContent = String(stream.sentAt.length);
}

// The zero-length binary frame: end of stream; the server answers the rest, then closes.
function endStream() {
  if (!stream || stream.ended) return;
  stream.ended = true;
  stream.ws.send(new ArrayBuffer(0));
  setState("streaming", "Finishing: waiting for the final text");
}

function receive(response) {
  const now = performance.now();
  const k = stream.received++;
  if (k < stream.sentAt.length) {
    stream.latencies.push(now - stream.sentAt[k]);
    showLatency(stream.latencies);
  }
  const text = response.alternatives[0]?.transcript ?? "";
  if (!response.is_provisional) stream.finalText += text;
  ui.final.textContent = stream.finalText.trimStart();
  const provisional = response.is_provisional ? text : "";
  ui.provisional.textContent = stream.finalText ? provisional : provisional.trimStart();
}

function percentile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function showLatency(latencies) {
  const sorted = [...latencies].sort((a, b) => a - b);
  ui.latency.textContent = latencies[latencies.length - 1].toFixed(1);
  ui.p50.textContent = percentile(sorted, 0.5).toFixed(1);
  ui.p99.textContent = percentile(sorted, 0.99).toFixed(1);
  drawChart(latencies, percentile(sorted, 0.5), percentile(sorted, 0.99));
}

// One bar per response (the latest CHART_POINTS), with the p50 and p99 of all of them as lines.
function drawChart(latencies, p50, p99) {
  const canvas = ui.chart;
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  g.font = "12px system-ui, sans-serif";
  const shown = latencies.slice(-CHART_POINTS);
  if (shown.length === 0) {
    g.fillStyle = "#66707a";
    g.fillText("latency per response (ms) appears here", 8, height / 2);
    return;
  }
  const top = Math.max(50, ...shown, p99) * 1.15;
  const y = (ms) => height - (ms / top) * (height - 4);
  const bar = width / CHART_POINTS;
  g.fillStyle = "#7bb8a6";
  shown.forEach((ms, i) => g.fillRect(i * bar, y(ms), Math.max(1, bar - 1), height - y(ms)));
  const lines = [["p50", p50, "#1f6f5c", width - 200], ["p99", p99, "#a3221b", width - 95]];
  for (const [label, ms, colour, x] of lines) {
    g.strokeStyle = g.fillStyle = colour;
    g.setLineDash([4, 3]);
    g.beginPath();
    g.moveTo(0, y(ms));
    g.lineTo(width, y(ms));
    g.stroke();
    g.fillText(`${label} ${ms.toFixed(1)} ms`, x, Math.max(12, y(ms) - 3));
  }
  g.setLineDash([]);
  g.fillStyle = "#66707a";
  g.fillText(`${top.toFixed(0)} ms`, 4, 12);
}

// The microphone: an AudioWorklet averages its channels, resamples to 16 kHz and cuts 60 ms frames.
async function startMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("This browser gives no microphone here (it needs https or localhost).");
  }
  setState("connecting", "Asking for the microphone");
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    throw new Error(`The microphone is not available: ${err.name}: ${err.message}`);
  }
  const context = new AudioContext();
  const release = () => {
    for (const track of media.getTracks()) track.stop();
    context.close();
  };
  try {
    await context.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url).href);
  } catch (err) {
    release();
    throw new Error(`Cannot load the audio worklet: ${err.message}`);
  }
  const input = context.createMediaStreamSource(media);
  // No outputs: the browser runs it without it being connected to the speakers.
  const framer = new AudioWorkletNode(context, "pcm-framer", { numberOfOutputs: 0 });
  framer.port.onmessage = ({ data }) => {
    sendAudio(data.pcm);
    if (data.type === "end") endStream();
  };
  setState("connecting", "Connecting");
  open({
    start: () => {
      input.connect(framer);
      context.resume(); // some browsers create it suspended outside the click's own task
    },
    stop: () => framer.port.postMessage({ type: "flush" }), // answered with the last partial frame
    release,
  });
}

// A file: decoded (mixed to mono, at 16 kHz) up front, then sent a frame each 60 ms, as it would
// arrive from a live recording.
async function streamFile(file) {
  setState("connecting", `Decoding ${file.name}`);
  let audio;
  try {
    audio = await new OfflineAudioContext(1, 1, TARGET_RATE).decodeAudioData(await file.arrayBuffer());
  } catch (err) {
    throw new Error(`Cannot decode ${file.name} as audio: ${err.message}`);
  }
  const channels = Array.from({ length: audio.numberOfChannels }, (_, c) => audio.getChannelData(c));
  const pcm = new Int16Array(audio.length);
  for (let i = 0; i < pcm.length; i++) {
    let sum = 0;
    for (const channel of channels) sum += channel[i];
    pcm[i] = toS16(sum / channels.length);
  }
  let timer = 0;
  let next = 0; // the next frame to send
  let startedAt = 0;
  const tick = () => {
    while (next * FRAME_SAMPLES < pcm.length && performance.now() >= startedAt + (next + 1) * FRAME_MS) {
      sendAudio(pcm.slice(next * FRAME_SAMPLES, (next + 1) * FRAME_SAMPLES).buffer);
      next++;
    }
    if (next * FRAME_SAMPLES >= pcm.length) endStream();
    else timer = setTimeout(tick, startedAt + (next + 1) * FRAME_MS - performance.now());
  };
  setState("connecting", "Connecting");
  open({
    start: () => {
      startedAt = performance.now();
      tick();
    },
    stop: () => {
      clearTimeout(timer);
      endStream();
    },
    release: () => clearTimeout(timer),
  });
}

function run(start) {
  ui.error.hidden = true;
  start().catch((err) => fail(err.message));
}

ui.mic.addEventListener("click", () => {
  const state = document.body.dataset.state;
  if (state !== "connecting" && state !== "streaming") run(startMicrophone);
  else if (stream?.ws.readyState === WebSocket.OPEN) stream.source.stop();
  else if (stream) {
    drop();
    setState("idle", "Stopped before the stream started");
  }
});

ui.file.addEventListener("change", () => {
  const [file] = ui.file.files;
  ui.file.value = ""; // choosing the same file again streams it again
  if (file && !stream) run(() => streamFile(file));
});

ui.endpoint.textContent = decodeURIComponent(streamUrl().replace(/api_key=[^&]*/, "api_key=…"));
drawChart([]);
