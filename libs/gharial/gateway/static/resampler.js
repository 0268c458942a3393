// Band-limited resampling for the demo page, in plain JavaScript (no dependencies): each output
// sample is a Kaiser-windowed sinc interpolation of the input, cutoff at 95% of the lower Nyquist,
// 16 zero crossings; the same filter as gharial.audio.resample, so the browser sends what
// `gharial transcribe` would hear. The rates are turned into up/down (output n sits at input
// position n·down/up) and the filter is tabulated for each of the `up` phases. Streaming: push()
// input blocks of any size; flush() at the end. Used by pcm-worklet.js, and by the tests; toS16()
// by the worklet and demo.js.

export const TARGET_RATE = 16000;
const ZERO_CROSSINGS = 16;
const MAX_PHASES = 1024;

// One float sample as a 16-bit integer, as gharial.audio.float_to_pcm16 (clipped, rounded).
export function toS16(value) {
  const scaled = Math.round(value * 32768);
  return scaled > 32767 ? 32767 : scaled < -32768 ? -32768 : scaled;
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

function besselI0(x) {
  // Power series; converges fast for the window's arguments (0..8.6).
  let sum = 1;
  let term = 1;
  const q = (x * x) / 4;
  for (let k = 1; k < 60; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < sum * 1e-17) break;
  }
  return sum;
}

export class Resampler {
  constructor(sourceRate, targetRate = TARGET_RATE, zeroCrossings = ZERO_CROSSINGS) {
    this.identity = sourceRate === targetRate; // as in Python: the same rate is left alone
    const g = gcd(sourceRate, targetRate);
    let up = targetRate / g;
    let down = sourceRate / g;
    if (up > MAX_PHASES) {
      // An odd device rate: approximate the ratio (an error below 0.05% in pitch and timing).
      up = 1000;
      down = Math.round((sourceRate * up) / targetRate);
    }
    const cutoff = Math.min(1, up / down) * 0.95; // fraction of the input Nyquist
    const reach = Math.ceil(zeroCrossings / cutoff); // input samples each side of an output
    const taps = 2 * reach;
    const weights = new Float32Array(up * taps);
    const norm = besselI0(8.6);
    for (let phase = 0; phase < up; phase++) {
      for (let j = 0; j < taps; j++) {
        const offset = j - reach + 1;
        const distance = (phase - offset * up) / up; // in input samples
        const x = cutoff * distance;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const r = (distance * cutoff) / zeroCrossings;
        const window = besselI0(8.6 * Math.sqrt(Math.max(0, 1 - r * r))) / norm;
        weights[phase * taps + j] = cutoff * sinc * window;
      }
    }
    Object.assign(this, { up, down, reach, taps, weights });
    // Input history: buf[i] holds input sample start + i; `reach` zeros precede the first sample.
    this.buf = new Float32Array(8192);
    this.start = -reach;
    this.length = reach;
    this.consumed = 0; // real input samples pushed
    this.produced = 0; // output samples made
    this.centre = 0; // floor(produced·down/up)
    this.phase = 0; // (produced·down) mod up
  }

  _append(samples) {
    if (this.length + samples.length > this.buf.length) {
      // Drop the history no output needs any more (inputs before centre - reach + 1).
      const keepFrom = Math.max(0, Math.min(this.length, this.centre - this.reach + 1 - this.start));
      const kept = this.buf.slice(keepFrom, this.length);
      const needed = kept.length + samples.length;
      if (needed > this.buf.length) this.buf = new Float32Array(2 * needed);
      this.buf.set(kept, 0);
      this.start += keepFrom;
      this.length = kept.length;
    }
    this.buf.set(samples, this.length);
    this.length += samples.length;
  }

  // Outputs whose inputs are all present; calls emit(value) for each.
  _produce(emit, limit = Infinity) {
    const { up, down, reach, taps, weights, buf } = this;
    while (this.produced < limit && this.centre + reach < this.start + this.length) {
      const first = this.centre - reach + 1 - this.start;
      const w = this.phase * taps;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buf[first + j] * weights[w + j];
      emit(acc);
      this.produced++;
      this.phase += down;
      while (this.phase >= up) {
        this.phase -= up;
        this.centre++;
      }
    }
  }

  push(samples, emit) {
    if (this.identity) {
      for (let i = 0; i < samples.length; i++) emit(samples[i]);
      return;
    }
    this._append(samples);
    this.consumed += samples.length;
    this._produce(emit);
  }

  // End of input: the outputs owed for it (len·up/down in all), with zeros after the input.
  flush(emit) {
    if (this.identity) return;
    const owed = Math.floor((this.consumed * this.up) / this.down);
    this._append(new Float32Array(this.taps + 1));
    this._produce(emit, owed);
  }
}
