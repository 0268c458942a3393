// AudioWorklet processor for the demo page: microphone audio at the device's rate in, 60 ms frames
// of 16 kHz S16LE mono out (960 samples, 1920 bytes, posted to the main thread as ArrayBuffers).
// Channels are averaged, then resampled by resampler.js.
//
// Messages from the main thread: {type: "flush"}: the input has ended; the outputs still owed for
// it are made with zeros after it, and the last, partial frame is posted as {type: "end", pcm}.

import { Resampler, toS16 } from "./resampler.js";

const FRAME_SAMPLES = 960; // 60 ms at 16 kHz

class PcmFramer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate); // `sampleRate`: the context's, a worklet global
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.ended = false;
    this.mono = new Float32Array(128);
    this.emit = (value) => {
      this.frame[this.filled++] = toS16(value);
      if (this.filled === FRAME_SAMPLES) {
        this.port.postMessage({ type: "frame", pcm: this.frame.buffer }, [this.frame.buffer]);
        this.frame = new Int16Array(FRAME_SAMPLES);
        this.filled = 0;
      }
    };
    this.port.onmessage = (event) => {
      if (event.data?.type !== "flush" || this.ended) return;
      this.ended = true;
      this.resampler.flush(this.emit);
      const tail = this.frame.slice(0, this.filled);
      this.port.postMessage({ type: "end", pcm: tail.buffer }, [tail.buffer]);
    };
  }

  process(inputs) {
    if (this.ended) return false;
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      const n = channels[0].length;
      if (this.mono.length !== n) this.mono = new Float32Array(n);
      const mono = this.mono;
      mono.set(channels[0]);
      for (let c = 1; c < channels.length; c++) {
        const data = channels[c];
        for (let i = 0; i < n; i++) mono[i] += data[i];
      }
      if (channels.length > 1) for (let i = 0; i < n; i++) mono[i] /= channels.length;
      this.resampler.push(mono, this.emit);
    }
    return true;
  }
}

registerProcessor("pcm-framer", PcmFramer);
