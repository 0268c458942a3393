"""N-gram language model shallow fusion: a word-level KenLM model over sentencepiece pieces.

The decoder emits sentencepiece pieces; a piece starting with "▁" (U+2581) begins a new word. The
LM state is the KenLM context plus the word being spelled so far. A word is scored when it is
complete, i.e. when the next word begins (or at `finish`), so the LM's opinion of a word arrives
one word late. Scoring pieces directly would need an LM trained on the same pieces, tied to one
tokenizer; scoring whole words lets any ordinary word ARPA file (or its KenLM binary) be used.

Scores are natural logs (KenLM's log10 converted), on the same scale as the acoustic log-probs.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import NamedTuple

import kenlm

from gharial.asr.tokenizer import WORD_START

LN_10 = math.log(10.0)


class LMState(NamedTuple):
    context: kenlm.State  # KenLM state after the last complete word
    partial: str  # the word spelled so far, not yet scored


class NgramLM:
    def __init__(self, path: str | Path, load_method: kenlm.LoadMethod | None = None) -> None:
        config = kenlm.Config()
        config.show_progress = False
        if load_method is not None:
            config.load_method = load_method
        try:
            self.model = kenlm.Model(str(path), config)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"cannot read n-gram LM {str(path)!r} (expected ARPA or KenLM binary): {e}"
            ) from e

    @classmethod
    def from_bytes(cls, data: bytes) -> NgramLM:
        """Load from the bytes of an ARPA or binary file (hardware checkpoints carry the LM inline).
        KenLM only reads files, so the bytes go through a temporary file, read fully into memory
        (not memory-mapped) so that the file can be deleted straight away."""
        with tempfile.TemporaryDirectory(prefix="gharial-lm-") as tmp:
            path = Path(tmp) / "lm"
            path.write_bytes(data)
            try:
                return cls(path, load_method=kenlm.LoadMethod.READ)
            except ValueError as e:  # name the bytes, not the throwaway file
                reason = str(e.__cause__ or e).replace(str(path), "<lm>")
                raise ValueError(f"embedded n-gram LM ({len(data)} bytes) cannot be read: {reason}") from e

    @property
    def order(self) -> int:
        return int(self.model.order)

    def begin(self) -> LMState:
        """The state at the start of a sentence (after <s>)."""
        context = kenlm.State()
        self.model.BeginSentenceWrite(context)
        return LMState(context, "")

    def _score(self, context: kenlm.State, word: str) -> tuple[kenlm.State, float]:
        out = kenlm.State()
        return out, self.model.BaseScore(context, word, out) * LN_10

    def advance(self, state: LMState, piece: str) -> tuple[LMState, float]:
        """The state after `piece` and the natural-log score of any word it completes."""
        if not piece.startswith(WORD_START):
            return LMState(state.context, state.partial + piece), 0.0
        word = piece[len(WORD_START) :]
        if not state.partial:
            return LMState(state.context, word), 0.0
        context, delta = self._score(state.context, state.partial)
        return LMState(context, word), delta

    def finish(self, state: LMState) -> float:
        """Score of ending the sentence here: the pending word, if any, then </s>."""
        context, total = state.context, 0.0
        if state.partial:
            context, total = self._score(context, state.partial)
        return total + self._score(context, "</s>")[1]
