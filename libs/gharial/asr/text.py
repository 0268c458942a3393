"""Transcript normalisation: the one policy used for training targets, tokenizers, keywords and references.

Every transcript that reaches a tokenizer, a loss or a WER computation goes through
`normalize_transcript`, so that the model is never asked to predict (or penalised for) casing,
punctuation or the many ways of writing a number.
"""

from __future__ import annotations

import re
import unicodedata

CHARSET = "abcdefghijklmnopqrstuvwxyz' "

# Characters folded to an ASCII apostrophe or hyphen before anything else.
_APOSTROPHES = str.maketrans({c: "'" for c in "’‘ʼ´`′‛"})
_MINUS_SIGNS = str.maketrans({c: "-" for c in "−‐‑"})  # dashes (– —) fall under step 5 instead
# Letters that NFKD does not decompose into a–z.
_LETTERS = str.maketrans({"æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"})
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at ", "=": " equals "}
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s in _SYMBOLS))
# Sentence punctuation and quotes are deleted; any other character outside CHARSET becomes a space.
_DELETED_RE = re.compile(r"[.,!?;:\"“”„‟«»¿¡]")
_OUTSIDE_CHARSET_RE = re.compile(r"[^a-z' ]")
_STRAY_APOSTROPHE_RE = re.compile(r"(?<![a-z])'|'(?![a-z])")
_SPACES_RE = re.compile(r" +")

_THOUSANDS_RE = re.compile(r"(?<![0-9])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])")
_NUMBER_RE = re.compile(
    r"(?P<currency>[$£€] ?)?"
    r"(?P<sign>(?<![a-z0-9])-)?"
    r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?"
    r"(?:(?P<suffix>st|nd|rd|th|'?s)(?![a-z]))?"
    r"(?: (?P<scale>thousand|million|billion|trillion)\b)?"
)
_CURRENCIES = {"$": ("dollar", "cent"), "£": ("pound", "penny"), "€": ("euro", "cent")}
_PLURALS = {"penny": "pence"}

_ONES = (  # noqa: SIM905 (a word list reads better than 20 quoted strings)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ["thousand", "million", "billion", "trillion", "quadrillion", "quintillion"]
_MAX_CARDINAL = 1000 ** (len(_SCALES) + 1)  # beyond this, numbers are read digit by digit
_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth"}
_ORDINALS |= {"nine": "ninth", "twelve": "twelfth"}


def normalize_transcript(text: str) -> str:
    """Map any text to lower-case a–z, apostrophe and single spaces (`CHARSET`), with numbers spelled out.

    The policy (CAIMAN-ASR convention), applied in this order:

    1. Curly/modifier apostrophes become ``'``; the Unicode minus sign and hyphens become ``-``.
    2. Unicode NFKD, case folding and accent stripping (``Café`` → ``cafe``, ``ß`` → ``ss``,
       ``²`` → ``2``); ``æ œ ø ł đ ð þ ı`` are spelled in ASCII; digits of any script become 0–9.
    3. Numbers are spelled out in English words without hyphens or "and":
       cardinals (``42`` → ``forty two``, ``1999`` → ``one thousand nine hundred ninety nine``,
       ``1,000`` → ``one thousand``), ordinals (``2nd`` → ``second``), plurals
       (``1990s``, ``1990's`` → ``... nineties``), decimals read digit by digit
       (``3.5`` → ``three point five``), negatives (``-3`` → ``minus three``),
       currency (``$5`` → ``five dollars``, ``$1.50`` → ``one dollar fifty cents``,
       ``£2 million`` → ``two million pounds``).
       Numbers with a leading zero or of 10^21 and above are read digit by digit (``007``).
    4. ``&`` ``%`` ``+`` ``@`` ``=`` become ``and`` ``percent`` ``plus`` ``at`` ``equals``.
    5. ``. , ! ? ; :`` and double quotes are deleted; every other character outside `CHARSET`
       (hyphens, slashes, brackets, other scripts, emoji...) becomes a space.
    6. Apostrophes survive only between two letters (``don't``; ``'hello'`` → ``hello``,
       ``students'`` → ``students``).
    7. Runs of spaces collapse to one; leading and trailing spaces are removed.

    The result is a fixed point: ``normalize_transcript(normalize_transcript(x)) == normalize_transcript(x)``.
    """
    text = text.translate(_APOSTROPHES).translate(_MINUS_SIGNS)
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    text = "".join(_fold_char(c) for c in text if unicodedata.category(c) not in ("Mn", "Me"))
    text = text.translate(_LETTERS)
    text = _THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), text)
    text = _NUMBER_RE.sub(_spell_number_match, text)
    text = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group()], text)
    text = _DELETED_RE.sub("", text)
    text = _OUTSIDE_CHARSET_RE.sub(" ", text)
    text = _STRAY_APOSTROPHE_RE.sub(" ", text)
    return _SPACES_RE.sub(" ", text).strip()


def _fold_char(c: str) -> str:
    """Digits of any script (Arabic-Indic, Devanagari...) become ASCII digits so they get spelled out."""
    if c.isascii() or not c.isdecimal():
        return c
    return str(unicodedata.decimal(c))


def _spell_number_match(m: re.Match[str]) -> str:
    int_part, frac, suffix, scale = m.group("int"), m.group("frac"), m.group("suffix"), m.group("scale")
    words = _spell_decimal(int_part, frac)
    if suffix in ("st", "nd", "rd", "th"):
        words = _ordinal(words) if frac is None else f"{words} {suffix}"
    elif suffix in ("s", "'s"):
        words = _plural(words)
    if m.group("sign"):
        words = f"minus {words}"
    if m.group("currency"):
        unit, subunit = _CURRENCIES[m.group("currency").strip()]
        if scale is None and frac is not None and len(frac) == 2:
            words = _spell_money(int_part, frac, unit, subunit)
        else:
            plural = scale is not None or frac is not None or int_part.lstrip("0") != "1"
            words = " ".join(w for w in (words, scale, _plural(unit) if plural else unit) if w)
    elif scale:
        words = f"{words} {scale}"
    return f" {words} "


def _spell_money(int_part: str, cents: str, unit: str, subunit: str) -> str:
    """``1`` + ``50`` → ``one dollar fifty cents``; a zero amount of either is left out."""
    parts = []
    if int(int_part) > 0 or int(cents) == 0:
        parts.append(f"{_spell_integer(int_part)} {unit if int(int_part) == 1 else _plural(unit)}")
    if int(cents) > 0:
        parts.append(f"{_cardinal(int(cents))} {subunit if int(cents) == 1 else _plural(subunit)}")
    return " ".join(parts)


def _spell_decimal(int_part: str, frac: str | None) -> str:
    words = _spell_integer(int_part)
    if frac is not None:
        words += " point " + _spell_digits(frac)
    return words


def _spell_integer(digits: str) -> str:
    """Cardinal words, or digit by digit where a cardinal would drop leading zeros or run out of scales."""
    if (len(digits) > 1 and digits[0] == "0") or int(digits) >= _MAX_CARDINAL:
        return _spell_digits(digits)
    return _cardinal(int(digits))


def _spell_digits(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _cardinal(n: int) -> str:
    """0 <= n < 10^21 in words: 1999 → "one thousand nine hundred ninety nine"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {_cardinal(rest)}" if rest else "")
    groups = []
    for scale in ["", *_SCALES]:
        n, group = divmod(n, 1000)
        if group:
            groups.append(_cardinal(group) + (f" {scale}" if scale else ""))
        if n == 0:
            break
    return " ".join(reversed(groups))


def _ordinal(cardinal: str) -> str:
    """Turn the last word of a cardinal into its ordinal: "twenty one" → "twenty first"."""
    head, _, last = cardinal.rpartition(" ")
    if last in _ORDINALS:
        last = _ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}" if head else last


def _plural(words: str) -> str:
    """Pluralise the last word: "nineteen ninety" → "nineteen nineties", "six" → "sixes"."""
    head, _, last = words.rpartition(" ")
    if last in _PLURALS:
        last = _PLURALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ies"
    elif last.endswith("x"):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}" if head else last
