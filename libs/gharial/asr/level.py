"""Automatic gain: lifts a quiet stream's speech to the level the model was trained at.

Why: the model has only heard speech near its training data's level; 10 dB quieter costs the
bundled model a quarter of its accuracy and 30 dB quieter it hears nothing (MODEL_CARD, "Stage
11"). A microphone far from the speaker, or turned down, is ordinary in production, so the front
end measures each stream's speech level as it arrives and turns quiet streams up.

How: the audio is cut into 10 ms blocks and each block's energy (dBFS) measured. A block is speech
when it and the two before it stand `gate_db` above the stream's noise floor (a minimum follower
that creeps up at `noise_rise_db_per_s`), so pauses, clicks and background never move the
estimate and the level holds through silence. Blocks below `no_signal_dbfs` (digital silence or
16-bit rounding noise: a padded file, a muted or starting microphone, the block where its signal
begins) are neither speech nor noise: a floor measured on them would make the room's own sound
that follows look like speech. The speech level is the mean power of the speech blocks, in dB
(an active speech level: the loud parts weigh most), over at most the last `memory_s` seconds of
speech, so that a long session follows a speaker who moves.

One gain per 60 ms frame, decided from the audio up to the end of that frame: 0 dB while the level
is at or above `boost_below_dbfs` (the training range: those streams' samples are untouched, bit
for bit); below it the lift grows over `knee_db` to the gain that brings the level to
`target_dbfs`, at most `max_gain_db`. The start of a stream is where the level is least known, and
the model is most sensitive there (one lifted or unlifted first frame can cost it the first word):
every talker's first syllable is quieter than their speech, so a level just under the training
range (above `unsure_below_dbfs`) is trusted only after `unsure_settle_s` of speech, while a level
far below it is a quiet talker and is lifted after `settle_s`. The gain rises at most
`attack_db_per_s` (it falls at once), and no block is lifted above `ceiling_dbfs`, so a quiet
stream whose talker suddenly comes close is not blown up.

Each frame's gain depends only on the stream's earlier audio and that frame, so any cutting of the
stream into chunks gives the same gains, and the offline path runs the same tracker.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from gharial.asr.config import FRAME_MS, StrictModel

BLOCK_S = 0.01  # energy is measured per 10 ms block
SILENCE_DBFS = -120.0  # the energy of digital silence, so every block has a finite level
SUSTAIN_BLOCKS = 3  # speech is 30 ms above the noise floor, so one click is not speech


class AutoGainConfig(StrictModel):
    """The level tracker's settings; the defaults were chosen on training utterances turned down
    (MODEL_CARD, "Automatic gain") and measured on speech-dev by `bench/level_robustness.py`."""

    boost_below_dbfs: float = Field(-35.0, description="speech level below which a stream is lifted")
    knee_db: float = Field(
        6.0, gt=0.0, description="the lift grows from 0 to full over this range below boost_below_dbfs"
    )
    target_dbfs: float = Field(-26.0, description="speech level a lifted stream is brought to")
    max_gain_db: float = Field(40.0, ge=0.0, description="largest lift")
    ceiling_dbfs: float = Field(-6.0, description="no 10 ms block is lifted above this level")
    gate_db: float = Field(20.0, gt=0.0, description="a block is speech this far above the noise floor")
    noise_rise_db_per_s: float = Field(5.0, gt=0.0, description="how fast the noise floor creeps up")
    no_signal_dbfs: float = Field(
        -100.0, description="quieter blocks (digital silence, 16-bit rounding) are neither speech nor noise"
    )
    memory_s: float = Field(5.0, gt=0.0, description="seconds of speech the level averages over")
    settle_s: float = Field(0.01, ge=0.0, description="seconds of speech heard before the gain may rise")
    unsure_settle_s: float = Field(
        0.1, ge=0.0, description="settle_s while the level is above unsure_below_dbfs: onsets look quiet"
    )
    unsure_below_dbfs: float = Field(
        -45.0, description="levels above this may be an onset, not a quiet talker"
    )
    attack_db_per_s: float = Field(600.0, gt=0.0, description="how fast the gain may rise")

    @model_validator(mode="after")
    def _check(self) -> AutoGainConfig:
        if self.target_dbfs < self.boost_below_dbfs:
            raise ValueError("auto gain: target_dbfs must not be below boost_below_dbfs")
        return self


DEFAULT_AUTO_GAIN = AutoGainConfig()
AUTO_GAIN_HELP = (
    "Lift speech that arrives quieter than the model's training level (a distant or turned-down "
    "microphone) by up to 40 dB, decided causally from the audio itself; speech at training level "
    "is left untouched. --no-auto-gain feeds the audio as it is."
)


def block_energies_dbfs(frames: Tensor, block_samples: int) -> list[float]:
    """Energy in dBFS of each `block_samples` block of [frames, samples] audio, in time order.
    In numpy: for one stream's 60 ms frame torch's per-operation overhead would cost more than
    the arithmetic."""
    blocks = frames.numpy().astype(np.float64).reshape(-1, block_samples)
    power = (blocks * blocks).sum(axis=1) / block_samples
    return [max(SILENCE_DBFS, 10.0 * math.log10(p)) if p > 0 else SILENCE_DBFS for p in power.tolist()]


class LevelTracker:
    """One stream's speech level and noise floor; `gains_db` advances them frame by frame."""

    def __init__(self, cfg: AutoGainConfig) -> None:
        self.cfg = cfg
        self.noise_dbfs: float | None = None  # set by the stream's first block with a signal
        self.speech_blocks = 0
        self.speech_power = 0.0  # running mean power of the speech blocks
        self.recent: list[float] = []  # the last SUSTAIN_BLOCKS blocks' energies
        self.gain = 0.0  # the last frame's gain, dB

    def observe(self, energy_dbfs: float) -> None:
        """Advance by one 10 ms block."""
        cfg = self.cfg
        self.recent = [*self.recent[1 - SUSTAIN_BLOCKS :], energy_dbfs]
        if energy_dbfs < cfg.no_signal_dbfs:  # digital silence is not a quiet room
            return
        rise = cfg.noise_rise_db_per_s * BLOCK_S
        self.noise_dbfs = energy_dbfs if self.noise_dbfs is None else min(energy_dbfs, self.noise_dbfs + rise)
        if len(self.recent) == SUSTAIN_BLOCKS and min(self.recent) > self.noise_dbfs + cfg.gate_db:
            self.speech_blocks += 1
            weight = min(self.speech_blocks, cfg.memory_s / BLOCK_S)
            power = 10.0 ** (energy_dbfs / 10.0)
            self.speech_power += (power - self.speech_power) / weight

    @property
    def level_dbfs(self) -> float | None:
        """The speech level: the mean power of the speech blocks in dBFS; None before any speech."""
        return 10.0 * math.log10(self.speech_power) if self.speech_blocks else None

    def gain_db(self, loudest_dbfs: float) -> float:
        """The gain for the frame just observed, whose loudest block is `loudest_dbfs`."""
        cfg = self.cfg
        level = self.level_dbfs
        wanted = 0.0
        heard = self.speech_blocks * BLOCK_S
        unsure = level is not None and level > cfg.unsure_below_dbfs
        settled = heard >= (cfg.unsure_settle_s if unsure else cfg.settle_s)
        if level is not None and settled and level < cfg.boost_below_dbfs:
            depth = min(1.0, (cfg.boost_below_dbfs - level) / cfg.knee_db)
            wanted = depth * (cfg.target_dbfs - level)
        attack = cfg.attack_db_per_s * FRAME_MS / 1000
        self.gain = max(
            0.0, min(cfg.max_gain_db, wanted, self.gain + attack, cfg.ceiling_dbfs - loudest_dbfs)
        )
        return self.gain

    def gains_db(self, frames: Tensor, block_samples: int) -> list[float]:
        """Advance over [frames, samples] audio; one gain per frame, from the audio up to its end."""
        energies = block_energies_dbfs(frames, block_samples)
        per_frame = len(energies) // frames.shape[0]
        gains = []
        for start in range(0, len(energies), per_frame):
            frame = energies[start : start + per_frame]
            for energy in frame:
                self.observe(energy)
            gains.append(self.gain_db(max(frame)))
        return gains

    def apply(self, frames: Tensor, block_samples: int) -> Tensor:
        """[frames, samples] audio with each frame scaled by its gain; untouched when every gain is 0 dB."""
        gains = self.gains_db(frames, block_samples)
        if not any(gains):
            return frames
        scale = np.array([10.0 ** (g / 20.0) for g in gains], dtype=np.float32)
        return torch.from_numpy(frames.numpy() * scale[:, None])
