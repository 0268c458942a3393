"""A word-level n-gram language model estimated in pure Python and written as an ARPA file.

KenLM's estimator (`lmplz`) is not part of the PyPI `kenlm` package, which only reads models; this
module builds the ARPA files that `gharial.asr.decoding.lm.NgramLM` reads for shallow fusion.

The estimator is interpolated Kneser-Ney (Chen & Goodman 1998, as in `lmplz` and SRILM's
``-interpolate -kndiscount``). Every text is normalised with `normalize_transcript` and padded with
``<s>`` and ``</s>``. The highest order uses raw counts; a lower-order n-gram uses its continuation
count, the number of distinct words seen before it, except when it starts with ``<s>`` (nothing can
precede it) where the raw count is kept. With adjusted counts ``a``, for a context ``h``:

    p(w | h) = max(a(hw) - D(a(hw)), 0) / Σ_v a(hv)  +  γ(h) · p(w | h')

where ``h'`` drops the first word of ``h``, and ``γ(h) = Σ_v D(a(hv)) / Σ_v a(hv)`` is the mass taken
off the seen words. The unigrams are interpolated with the uniform distribution over the vocabulary
(every word seen, ``</s>`` and ``<unk>``), so ``<unk>`` gets ``γ(ε) / |V|``. The discounts D1, D2,
D3+ of each order come from that order's counts of counts ``n_k``: ``Y = n1 / (n1 + 2 n2)``,
``D_k = k - (k + 1) Y n_{k+1} / n_k``; where counts are too few for that, one discount
``D = n1 / (n1 + 2 n2)`` (plain Kneser-Ney), or a fixed `discount` for every order if given.

The ARPA file lists each seen n-gram with its interpolated log10 probability and, when it is the
context of a longer n-gram, its log10 backoff weight ``γ(h)``: an unseen word then scores
``γ(h) · p(w | h')`` exactly as the formula above, which is how SRILM writes interpolated models.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from gharial.asr.text import normalize_transcript

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
NEVER = -99.0  # log10 probability of <s>, which is never predicted

Ngram = tuple[str, ...]


def build_arpa(
    texts: Iterable[str], order: int = 3, discount: float | None = None, min_count: int = 1
) -> str:
    """An interpolated Kneser-Ney model of `texts` (one sentence each) in ARPA format. A text that
    normalises to nothing still counts, as the sentence ``<s> </s>``.

    `discount`: None estimates modified Kneser-Ney discounts (D1, D2, D3+) per order from the
    counts of counts; a number in (0, 1] is one fixed discount for every order (plain Kneser-Ney).
    `min_count`: highest-order n-grams seen fewer times are left out of the file (their mass goes
    to the backoff weight, so the model still normalises); 1 keeps every n-gram.
    The output depends only on the texts and the settings: the same texts give the same string."""
    if order < 2:
        raise ValueError(f"order must be at least 2 (word-level shallow fusion needs bigrams), got {order}")
    if discount is not None and not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = _adjusted_counts(texts, order)
    probs: list[dict[Ngram, float]] = []  # per order (index n - 1): n-gram -> p(w | h)
    bows: list[dict[Ngram, float]] = []  # per order: context -> backoff weight, where not 1
    for n in range(1, order + 1):
        discounts = _discounts(counts[n - 1].values(), discount)
        keep = min_count if n == order else 0
        prob, bow = _estimate(counts[n - 1], probs[-1] if probs else None, discounts, keep)
        probs.append(prob)
        if n > 1:
            bows.append(bow)
    bows.append({})  # the highest order is nobody's context
    return _format_arpa(probs, bows)


def _sentences(texts: Iterable[str]) -> Iterable[list[str]]:
    for text in texts:
        yield [BOS, *normalize_transcript(text).split(), EOS]


def _adjusted_counts(texts: Iterable[str], order: int) -> list[dict[Ngram, int]]:
    """Per order: raw counts at the highest order and for n-grams starting with <s>, continuation
    counts (distinct left neighbours) otherwise. The unigram <s> is left out; <unk> has count 0."""
    raw: list[Counter[Ngram]] = [Counter() for _ in range(order)]
    any_text = False
    for words in _sentences(texts):
        any_text = True
        for n in range(1, order + 1):
            top = n == order
            for i in range(len(words) - n + 1):
                if top or i == 0:  # lower orders need raw counts only for n-grams starting with <s>
                    raw[n - 1][tuple(words[i : i + n])] += 1
    if not any_text:
        raise ValueError("no text to estimate a language model from")
    counts: list[dict[Ngram, int]] = [{} for _ in range(order)]
    counts[order - 1] = dict(raw[order - 1])
    for n in range(order - 1, 0, -1):
        # <s> occurs only first, so an n-gram starting with it is never the suffix of a longer one
        counts[n - 1] = dict(Counter(g[1:] for g in counts[n])) | raw[n - 1]
    counts[0].pop((BOS,), None)
    counts[0].setdefault((EOS,), 0)
    counts[0].setdefault((UNK,), 0)
    return counts


def _discounts(counts: Iterable[int], fixed: float | None) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the counts of counts: modified Kneser-Ney where there are enough counts,
    else one plain Kneser-Ney discount n1 / (n1 + 2 n2), else 0.5."""
    if fixed is not None:
        return (fixed, fixed, fixed)
    n = Counter(c for c in counts if 1 <= c <= 4)
    n1, n2, n3, n4 = n[1], n[2], n[3], n[4]
    if n1 == 0 or n2 == 0:
        return (0.5, 0.5, 0.5) if n1 == 0 else (1.0, 1.0, 1.0)
    y = n1 / (n1 + 2 * n2)
    if n3 and n4:
        modified = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < d <= k for k, d in enumerate(modified, 1)):
            return modified
    return (y, y, y)


def _estimate(
    counts: dict[Ngram, int],
    lower: dict[Ngram, float] | None,
    discounts: tuple[float, float, float],
    min_count: int,
) -> tuple[dict[Ngram, float], dict[Ngram, float]]:
    """Interpolated probabilities of one order's n-grams (those with a count of at least `min_count`)
    and the backoff weights of their contexts. `lower` is the next order down; None for unigrams."""
    by_context: defaultdict[Ngram, list[tuple[Ngram, int]]] = defaultdict(list)
    for gram, count in counts.items():
        by_context[gram[:-1]].append((gram, count))
    prob: dict[Ngram, float] = {}
    bow: dict[Ngram, float] = {}
    for context, grams in by_context.items():
        total = sum(c for _, c in grams)
        taken = sum(discounts[min(c, 3) - 1] for _, c in grams if c > 0)
        gamma = taken / total if total else 1.0
        kept_p = kept_lower = 0.0
        for gram, count in grams:
            # lower-order probability of the same word: uniform for unigrams, else the suffix n-gram
            p_lower = 1.0 / len(counts) if lower is None else lower[gram[1:]]
            p = (max(count - discounts[min(count, 3) - 1], 0.0) / total if total else 0.0) + gamma * p_lower
            if count >= min_count:
                prob[gram] = p
                kept_p += p
                kept_lower += p_lower
        if any(c < min_count for _, c in grams):
            # pruned words: whatever mass the kept ones leave, in proportion to the lower order
            gamma = (1.0 - kept_p) / (1.0 - kept_lower) if kept_lower < 1.0 else 1.0
        if context and gamma != 1.0:
            bow[context] = gamma
    return prob, bow


def _format_arpa(probs: list[dict[Ngram, float]], bows: list[dict[Ngram, float]]) -> str:
    order = len(probs)
    lines = ["\\data\\"]
    lines += [f"ngram {n}={len(probs[n - 1]) + (n == 1)}" for n in range(1, order + 1)]  # + <s>
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        entries = dict(probs[n - 1])
        if n == 1:
            entries[(BOS,)] = 10.0**NEVER
        for gram in sorted(entries):
            logp = NEVER if gram == (BOS,) else _log10(entries[gram])
            line = f"{logp:.6f}\t{' '.join(gram)}"
            if gram in bows[n - 1]:
                line += f"\t{_log10(bows[n - 1][gram]):.6f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else NEVER
