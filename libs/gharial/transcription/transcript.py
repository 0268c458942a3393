"""A stream's text as its responses carry it: final deltas, provisional tails, ranked alternatives.

The rule (protos/transcriber.proto): the transcripts of a stream's final responses, concatenated
exactly as they are, give the whole transcript, and that is the text offline recognition gives for
the same tokens (`SpeechToText.text`: pieces joined, outer spaces stripped). So each final carries
the *visible* text added since the previous final: with its own leading space when it continues
earlier text, none at the very start, and a trailing space held back until more text follows it
(offline text ends without one). Visible text only ever grows by appending, so these deltas exist.
A provisional tail is computed the same way from the finalised tokens plus the unfinalised ones.

Alternatives and confidence. A provisional response lists, first, the recognizer's provisional
tail (for beam search the prefix every hypothesis shares, DESIGN §2), then the decoder's hypotheses
(the n-best, best first). The confidence of a text is the share of the decoder's belief in the
hypotheses that say it or continue it: the softmax of the n-best log-scores, summed over the
hypotheses whose tail starts with that text. The first entry is continued by every hypothesis, so
its confidence is 1. Greedy decoding (on the CPU or the card) keeps one hypothesis and reports no
score, so its single alternative always has confidence 1: it means "nothing else was considered",
not a calibrated probability. A final response carries one alternative, the committed text, with
confidence 1: committing keeps only the chosen hypothesis, so no other one is left to rank it against.
"""

from __future__ import annotations

import math

from gharial.asr.decoding.base import Token
from gharial.asr.pipeline import tokens_to_text
from gharial.asr.tokenizer import Tokenizer
from gharial.protos import transcriber_pb2 as pb

MAX_CACHED_TAILS = 256  # a beam's hypotheses over a few frames


class Transcript:
    """The text finalised so far in one stream, and the tails and alternatives built on it."""

    def __init__(self, tokenizer: Tokenizer, continues: bool = False) -> None:
        self.tokenizer = tokenizer
        # A replayed stream continues text the client already has: its first words need a space.
        self._lead = " " if continues else ""
        self._finalised = ""  # raw text (pieces joined) of every finalised token
        self._sent = ""  # its visible part, already sent in final responses
        # tail() by token ids, until the next finalise: a stream's unfinalised tokens change only
        # every few frames, and greedy's one hypothesis is the provisional tail itself.
        self._tails: dict[tuple[int, ...], str] = {}

    def _visible(self, raw: str) -> str:
        text = raw.strip()
        return self._lead + text if text else ""

    def finalise(self, tokens: list[Token]) -> str:
        """Make `tokens` final; returns the visible text they add (the final response's transcript)."""
        self._finalised += tokens_to_text(self.tokenizer, tokens)
        visible = self._visible(self._finalised)
        delta = visible[len(self._sent) :]
        self._sent = visible
        self._tails.clear()
        return delta

    def tail(self, tokens: list[Token]) -> str:
        """The visible text unfinalised `tokens` would add after the finalised text."""
        ids = tuple(t.id for t in tokens)
        text = self._tails.get(ids)
        if text is None:
            if len(self._tails) >= MAX_CACHED_TAILS:
                self._tails.clear()
            text = self._visible(self._finalised + tokens_to_text(self.tokenizer, tokens))[len(self._sent) :]
            self._tails[ids] = text
        return text

    def alternatives(
        self, provisional: list[Token], nbest: list[tuple[list[Token], float]], limit: int
    ) -> list[pb.Alternative]:
        """Up to `limit` provisional alternatives, by decreasing confidence (see the module docstring)."""
        shares = softmax([score for _, score in nbest])
        tails = [self.tail(tokens) for tokens, _ in nbest]
        candidates = list(dict.fromkeys([self.tail(provisional), *tails]))
        confidence = {
            text: sum(share for tail, share in zip(tails, shares, strict=True) if tail.startswith(text))
            for text in candidates
        }
        ranked = sorted(candidates, key=lambda text: -confidence[text])  # stable: ties keep their order
        return [pb.Alternative(transcript=t, confidence=min(1.0, confidence[t])) for t in ranked[:limit]]


def softmax(scores: list[float]) -> list[float]:
    if not scores:
        return []
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]
