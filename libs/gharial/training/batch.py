"""Turning utterances into a training batch: audio augmentation, features, SpecAugment, targets.

Everything random here draws from a generator seeded by (seed, batch position), so the batch at a
given position is the same whether the run started there or resumed there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gharial.asr.features import FeatureExtractor
from gharial.asr.text import CHARSET, normalize_transcript
from gharial.asr.tokenizer import Tokenizer
from gharial.audio import load_audio
from gharial.data.augment import change_speed, coloured_noise, mix_at_snr, narrowband, snr_range, spec_augment
from gharial.data.manifest import Utterance
from gharial.data.teacher import TeacherStore
from gharial.training.config import AugmentConfig

BACKGROUND_FINAL_SNR = (0.0, 30.0)  # dB, the documented final ranges
BABBLE_FINAL_SNR = (15.0, 30.0)
TOKEN_SAMPLING_ALPHA = 0.1  # sentencepiece subword-regularisation smoothing
TOKEN_SAMPLING_NBEST = 64  # segmentations of each word sampled among
CHARACTER_BLANK = len(CHARSET)  # the character CTC head's blank, after CHARSET's letters (blank last)


@dataclass
class Batch:
    """features [B, T, F] (T a multiple of 2), feature_lengths [B], targets [B, U] (token ids),
    target_lengths [B], characters [B, C] (CHARSET indices: the character CTC head's targets),
    character_lengths [B], teacher [B, T / stack_time, D]: the distillation targets, one per
    encoder frame (None without a teacher store)."""

    features: Tensor
    feature_lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    characters: Tensor
    character_lengths: Tensor
    audio_seconds: float
    teacher: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.features.to(device), self.feature_lengths.to(device), self.targets.to(device),
            self.target_lengths.to(device), self.characters.to(device), self.character_lengths.to(device),
            self.audio_seconds, None if self.teacher is None else self.teacher.to(device),
        )  # fmt: skip


class BatchMaker:
    def __init__(
        self,
        extractor: FeatureExtractor,
        tokenizer: Tokenizer,
        augment: AugmentConfig,
        noise_files: list[Path] | None = None,
        teacher: TeacherStore | None = None,
        teacher_stride: int = 1,
    ) -> None:
        """teacher: distillation targets, resampled to one per `teacher_stride` feature frames."""
        self.extractor = extractor
        self.tokenizer = tokenizer
        self.augment = augment
        self.noise_files = noise_files or []
        self.teacher = teacher
        self.teacher_stride = teacher_stride
        self.sample_rate = extractor.cfg.sample_rate

    def __call__(self, utterances: list[Utterance], step: int, seed: int, train: bool = True) -> Batch:
        rng = random.Random(f"{seed}/batch/{step}/{utterances[0].id}")
        audios = [u.load_audio(self.sample_rate) for u in utterances]
        transcripts = [u.transcript for u in utterances]
        if train:
            audios, transcripts = self.join_utterances(audios, transcripts, rng)
            audios = self.augment_audio(audios, step, rng)
        features = []
        for audio in audios:
            # dither draws from torch's global generator: seed it from this batch's rng, or the
            # batch would depend on what ran before it in this process (breaking exact resume)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                f = self.extractor(audio, dither=self.extractor.cfg.dither if train else 0.0)
            if train:
                a = self.augment
                f = spec_augment(
                    f, self.extractor.cfg.n_mels, a.spec_freq_masks, a.spec_max_freq,
                    a.spec_time_masks, a.spec_max_time, rng,
                )  # fmt: skip
            features.append(f)
        targets = [self.encode(transcript, rng if train else None) for transcript in transcripts]
        characters = [encode_characters(transcript) for transcript in transcripts]
        return Batch(
            features=torch.nn.utils.rnn.pad_sequence(features, batch_first=True),
            feature_lengths=torch.tensor([len(f) for f in features]),
            targets=_pad(targets),
            target_lengths=torch.tensor([len(t) for t in targets]),
            characters=_pad(characters),
            character_lengths=torch.tensor([len(c) for c in characters]),
            audio_seconds=sum(len(a) for a in audios) / self.sample_rate,
            teacher=None if self.teacher is None else self.teacher_frames(utterances, features),
        )

    def teacher_frames(self, utterances: list[Utterance], features: list[Tensor]) -> Tensor:
        """Each utterance's teacher frames stretched linearly to its encoder frames: speed
        perturbation changed the audio's length, not what was said when."""
        assert self.teacher is not None
        out = []
        for utt, f in zip(utterances, features, strict=True):
            frames = self.teacher.frames(utt.id)  # [n, D]
            n = -(-len(f) // self.teacher_stride)
            out.append(F.interpolate(frames.T[None], size=n, mode="linear", align_corners=False)[0].T)
        return torch.nn.utils.rnn.pad_sequence(out, batch_first=True)

    def encode(self, transcript: str, rng: random.Random | None) -> list[int]:
        """Token ids; with `rng`, a fraction `token_sampling` of transcripts is tokenized by sampling
        among sentencepiece segmentations instead of the most probable one."""
        if rng is not None and rng.random() < self.augment.token_sampling:
            return sample_segmentation(self.tokenizer, transcript, TOKEN_SAMPLING_ALPHA, rng)
        return self.tokenizer.encode(transcript)

    def join_utterances(
        self, audios: list[Tensor], transcripts: list[str], rng: random.Random
    ) -> tuple[list[Tensor], list[str]]:
        """With chance `prob_join`, the batch's utterances are joined in pairs (the first with the
        second, the third with the fourth, ...), a silent pause between them that the noise
        augmentations fill, and their transcripts likewise. Pairs, not a second utterance added to
        each row: the batch then holds half as many rows twice as long, so the RNN-T joint costs
        twice a plain batch's instead of four times (a last odd utterance stays alone)."""
        a = self.augment
        if not a.prob_join or len(audios) < 2 or rng.random() >= a.prob_join:
            return audios, transcripts
        joined_audios, joined_transcripts = [], []
        for i in range(0, len(audios), 2):
            if i + 1 == len(audios):
                joined_audios.append(audios[i])
                joined_transcripts.append(transcripts[i])
                continue
            gap = torch.zeros(round(rng.uniform(*a.join_gap_s) * self.sample_rate))
            joined_audios.append(torch.cat([audios[i], gap, audios[i + 1]]))
            joined_transcripts.append(f"{transcripts[i]} {transcripts[i + 1]}")
        return joined_audios, joined_transcripts

    def augment_audio(self, audios: list[Tensor], step: int, rng: random.Random) -> list[Tensor]:
        """Speed perturbation, background noise, babble, narrowband and level, each applied independently."""
        a = self.augment
        initial = (a.noise_initial_low, a.noise_initial_high)
        out = []
        for i, audio in enumerate(audios):
            if a.speed_perturbation is not None:
                audio = change_speed(audio, round(rng.uniform(*a.speed_perturbation), 2), self.sample_rate)
            if rng.random() < a.prob_background_noise:
                low, high = snr_range(
                    step, initial, BACKGROUND_FINAL_SNR, a.noise_delay_steps, a.noise_ramp_steps
                )
                audio = mix_at_snr(audio, self.background_noise(len(audio), rng), rng.uniform(low, high))
            if len(audios) > 1 and rng.random() < a.prob_babble_noise:
                low, high = snr_range(
                    step, initial, BABBLE_FINAL_SNR, a.noise_delay_steps, a.noise_ramp_steps
                )
                other = audios[rng.choice([j for j in range(len(audios)) if j != i])]
                audio = mix_at_snr(audio, other, rng.uniform(low, high))
            if rng.random() < a.prob_train_narrowband:
                audio = narrowband(audio, self.sample_rate)
            if a.gain_db is not None:
                audio = (audio * 10 ** (rng.uniform(*a.gain_db) / 20)).clamp(-1.0, 1.0)
            out.append(audio)
        return out

    def background_noise(self, n: int, rng: random.Random) -> Tensor:
        """A random noise file when `noise_dir` is set, else generated coloured noise."""
        if self.noise_files:
            return load_audio(rng.choice(self.noise_files), self.sample_rate)
        return coloured_noise(n, rng)


def encode_characters(transcript: str) -> list[int]:
    """The normalised transcript as CHARSET indices (every character of it is in CHARSET)."""
    return [CHARSET.index(c) for c in normalize_transcript(transcript)]


def _pad(sequences: list[list[int]]) -> Tensor:
    tensors = [torch.tensor(s, dtype=torch.long) for s in sequences]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)


def sample_segmentation(tokenizer: Tokenizer, transcript: str, alpha: float, rng: random.Random) -> list[int]:
    """Subword regularisation drawing only from `rng`: each word's segmentation is sampled among its
    `TOKEN_SAMPLING_NBEST` best with P ∝ P(segmentation)^alpha (pieces never cross words, so words
    are independent). sentencepiece's own sampling is not reproducible across processes even after
    `set_random_generator_seed`, which made batches depend on the process that built them."""
    ids: list[int] = []
    for word in normalize_transcript(transcript).split():
        options = tokenizer.nbest_segmentations(word, TOKEN_SAMPLING_NBEST)
        best = max(score for _, score in options)
        weights = [math.exp(alpha * (score - best)) for _, score in options]
        ids += rng.choices(options, weights=weights)[0][0]
    return ids
