"""Keyword boosting: a bonus for every token that extends a match of a user-given keyword.

Keywords are token-id sequences kept in a trie. A hypothesis carries a `KeywordState`: the trie
node it has matched up to and the bonus collected on that still-partial match. The rule:

- a token that continues a trie path earns `boost`;
- a token that completes a keyword commits the bonus collected so far: it stays in the score.
  If longer keywords continue from there the state stays on that node (with nothing pending),
  otherwise it goes back to the root;
- a token that breaks a partial match refunds (subtracts) the pending bonus and is tried again
  from the root, where it may start a new match.

Refunding is what makes boosting safe: a hypothesis only keeps bonus for keywords it actually
says, so boosting cannot promote a mere prefix of a keyword (the first pieces of a name followed
by something else) over what the audio says. The decoder also refunds a still-pending bonus when
it ranks hypotheses for a commit (`pending`).
Matching restarts only at the failing token (no Aho-Corasick failure links), which misses a
keyword that starts inside a failed partial match of another: a deliberate simplification.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeywordState:
    """Trie node matched so far (0 = root) and the bonus pending on that partial match."""

    node: int = 0
    bonus: float = 0.0


ROOT = KeywordState()


class KeywordBoost:
    def __init__(self, keywords: list[list[int]], boost: float) -> None:
        if any(not keyword for keyword in keywords):
            raise ValueError("keywords must not be empty token sequences")
        self.boost = boost
        self._children: list[dict[int, int]] = [{}]
        self._is_end: list[bool] = [False]
        for keyword in keywords:
            node = 0
            for token in keyword:
                child = self._children[node].get(token)
                if child is None:
                    child = len(self._children)
                    self._children[node][token] = child
                    self._children.append({})
                    self._is_end.append(False)
                node = child
            self._is_end[node] = True

    def initial(self) -> KeywordState:
        return ROOT

    def advance(self, state: KeywordState, token: int) -> tuple[KeywordState, float]:
        """The state after `token` and the change of score it brings (refunds are negative)."""
        delta = 0.0
        child = self._children[state.node].get(token)
        if child is None and state.node != 0:
            delta, state = -state.bonus, ROOT  # broken partial match: refund, retry from the root
            child = self._children[0].get(token)
        if child is None:
            return ROOT, delta
        delta += self.boost
        if self._is_end[child]:
            return (KeywordState(child) if self._children[child] else ROOT), delta
        return KeywordState(child, state.bonus + self.boost), delta

    def pending(self, state: KeywordState) -> float:
        """Bonus not yet earned: what a hypothesis ending here would have refunded."""
        return state.bonus
