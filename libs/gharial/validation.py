"""Validation: word error rate of a hardware checkpoint on labelled speech.

Utterances are decoded by the same streaming `Recognizer` the transcriber service runs: a batch
of utterances advances in lock-step, one 60 ms frame per `Recognizer.step`, exactly as concurrent
streams do on a server. References and hypotheses are both passed through Whisper's English
normaliser before words are compared, so spelling variants ("colour"/"color", "Mr."/"mister")
are not counted as errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from functools import cache

import torch
from pydantic import BaseModel
from torch import Tensor
from tqdm import tqdm

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.base import Token
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.pipeline import SpeechToText
from gharial.asr.streaming import StreamingConfig
from gharial.data.manifest import Utterance
from gharial.training.config import TrainConfig

MAX_INPUTS_PER_BATCH = 10_000_000  # encoder input values (frames × features) per batch
MAX_BATCH = 64


@cache
def _normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_for_wer(text: str) -> list[str]:
    """Words of `text` after Whisper's English normaliser."""
    return _normalizer()(text).split()


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between word or token sequences."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


class UtteranceResult(BaseModel):
    id: str
    reference: str
    hypothesis: str
    errors: int
    words: int


class ValidationReport(BaseModel):
    wer: float  # a fraction: errors / reference words
    errors: int
    words: int
    utterances: int
    audio_seconds: float
    decode_seconds: float
    rtf: float  # decode time / audio time
    results: list[UtteranceResult]


def score(ids: list[str], references: list[str], hypotheses: list[str]) -> list[UtteranceResult]:
    results = []
    for utt_id, ref, hyp in zip(ids, references, hypotheses, strict=True):
        ref_words, hyp_words = normalize_for_wer(ref), normalize_for_wer(hyp)
        results.append(
            UtteranceResult(
                id=utt_id,
                reference=ref,
                hypothesis=hyp,
                errors=edit_distance(ref_words, hyp_words),
                words=len(ref_words),
            )
        )
    return results


def report(results: list[UtteranceResult], audio_seconds: float, decode_seconds: float) -> ValidationReport:
    errors, words = sum(r.errors for r in results), sum(r.words for r in results)
    return ValidationReport(
        wer=errors / words if words else 0.0, errors=errors, words=words, utterances=len(results),
        audio_seconds=audio_seconds, decode_seconds=decode_seconds,
        rtf=decode_seconds / audio_seconds if audio_seconds else 0.0, results=results,
    )  # fmt: skip


def decode_in_lockstep(stt: SpeechToText, features: list[Tensor]) -> list[list[Token]]:
    """Tokens of each utterance, all advancing one 60 ms frame per Recognizer.step, like live streams."""
    recognizer = stt.recognizer
    per_frame = recognizer.frames_per_step
    streams = [recognizer.new_stream() for _ in features]
    frames = [len(f) // per_frame for f in features]
    tokens: list[list[Token]] = [[] for _ in features]
    for t in range(max(frames, default=0)):
        active = [i for i, n in enumerate(frames) if t < n]
        step_features = torch.stack([features[i][t * per_frame : (t + 1) * per_frame] for i in active])
        for i, result in zip(
            active, recognizer.step(step_features, [streams[i] for i in active]), strict=True
        ):
            tokens[i] += result.final or []
            if t + 1 == frames[i]:
                tokens[i] += recognizer.finish(streams[i])
    return tokens


def validate(
    checkpoint: HardwareCheckpoint,
    utterances: list[Utterance],
    beam_width: int = 1,
    streaming: StreamingConfig | None = None,
    max_inputs_per_batch: int = MAX_INPUTS_PER_BATCH,
    progress: bool = False,
    auto_gain: AutoGainConfig | None = DEFAULT_AUTO_GAIN,
) -> ValidationReport:
    """WER of `checkpoint` on `utterances`. Batches hold at most `max_inputs_per_batch` encoder
    inputs; a batch that runs out of memory is split in two and retried."""
    stt = SpeechToText(checkpoint, beam_width=beam_width, streaming=streaming, auto_gain=auto_gain)
    rate = checkpoint.meta.config.features.sample_rate
    order = sorted(range(len(utterances)), key=lambda i: utterances[i].duration)
    hypotheses: dict[int, str] = {}
    audio_seconds = decode_seconds = 0.0
    bar = tqdm(total=len(utterances), desc="validating", disable=not progress)
    pending = _batches(order, utterances, checkpoint, max_inputs_per_batch)
    while pending:
        batch = pending.pop(0)
        audios = [utterances[i].load_audio(rate) for i in batch]
        started = time.perf_counter()
        try:
            tokens = decode_in_lockstep(stt, [stt.features(a) for a in audios])
        except RuntimeError as err:
            if "out of memory" not in str(err) or len(batch) == 1:
                raise
            half = len(batch) // 2
            pending[:0] = [batch[:half], batch[half:]]
            continue
        decode_seconds += time.perf_counter() - started
        audio_seconds += sum(len(a) for a in audios) / rate
        hypotheses.update({i: stt.text(t) for i, t in zip(batch, tokens, strict=True)})
        bar.update(len(batch))
    bar.close()
    ids = [u.id for u in utterances]
    results = score(ids, [u.transcript for u in utterances], [hypotheses[i] for i in range(len(utterances))])
    return report(results, audio_seconds, decode_seconds)


def _batches(
    order: list[int], utterances: list[Utterance], checkpoint: HardwareCheckpoint, max_inputs: int
) -> list[list[int]]:
    """Consecutive runs of `order` (sorted by duration) whose padded encoder input fits `max_inputs`."""
    cfg = checkpoint.meta.config
    inputs_per_second = cfg.features.feature_dim * 1000 / (cfg.features.hop_ms * cfg.features.stack)
    batches: list[list[int]] = []
    for i in order:
        longest = utterances[i].duration * inputs_per_second  # order is by duration: i is the longest
        if batches and len(batches[-1]) < MAX_BATCH and (len(batches[-1]) + 1) * longest <= max_inputs:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def validation_function(cfg: TrainConfig) -> Callable[[HardwareCheckpoint], float] | None:
    """For `gharial train`: WER (greedy) on the config's val_manifests, or None when it has none."""
    from gharial.data.readers import read_utterances

    if not cfg.data.val_manifests:
        return None
    utterances = []
    for manifest in cfg.data.val_manifests:
        utterances += read_utterances(manifest)[: cfg.val_utterances]
    return lambda checkpoint: validate(checkpoint, utterances).wer
