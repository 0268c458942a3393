"""The transcript normalisation policy: one example per rule, plus properties over arbitrary text."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gharial.asr.text import CHARSET, normalize_transcript


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case, accents, compatibility forms
        ("Hello World", "hello world"),
        ("Café NAÏVE résumé", "cafe naive resume"),
        ("Straße ﬁne Æsop", "strasse fine aesop"),
        ("x² İstanbul", "x two istanbul"),
        # apostrophes
        ("don’t", "don't"),
        ("It‘s", "it's"),
        ("'hello'", "hello"),
        ("students' books", "students books"),
        ("rock 'n' roll", "rock n roll"),
        ("rock'n'roll", "rock'n'roll"),
        # punctuation: deleted or turned into spaces
        ("Hello, world! How are you?", "hello world how are you"),
        ('he said "yes"; then: “no”', "he said yes then no"),
        ("U.S.A.", "usa"),
        ("well-known and/or (maybe)", "well known and or maybe"),
        ("wait—what", "wait what"),
        ("snake_case #tag", "snake case tag"),
        # symbols
        ("Tom & Jerry", "tom and jerry"),
        ("50%", "fifty percent"),
        ("C++ at a@b", "c plus plus at a at b"),
        # whitespace
        ("  multiple   spaces\t\nhere ", "multiple spaces here"),
        ("", ""),
        ("?!...", ""),
        # other scripts and emoji become separators
        ("hi🙂there", "hi there"),
        ("naïve 日本 word", "naive word"),
    ],
)
def test_policy_examples(raw: str, expected: str) -> None:
    assert normalize_transcript(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", "zero"),
        ("7", "seven"),
        ("13", "thirteen"),
        ("42", "forty two"),
        ("100", "one hundred"),
        ("101", "one hundred one"),
        ("1999", "one thousand nine hundred ninety nine"),
        ("2024", "two thousand twenty four"),
        ("1,000,000", "one million"),
        ("1000001", "one million one"),
        ("1000000000000", "one trillion"),
        (
            "999999999999",
            "nine hundred ninety nine billion nine hundred ninety nine million "
            "nine hundred ninety nine thousand nine hundred ninety nine",
        ),
        ("007", "zero zero seven"),
        (
            "1234567890123456789012",
            "one two three four five six seven eight nine zero one two "
            "three four five six seven eight nine zero one two",
        ),
        # decimals, negatives
        ("3.5", "three point five"),
        ("3.14", "three point one four"),
        ("0.05", "zero point zero five"),
        ("-3", "minus three"),
        ("it was -3.5 degrees", "it was minus three point five degrees"),
        ("−7", "minus seven"),
        ("5-3", "five three"),
        ("pages 10-20", "pages ten twenty"),
        # ordinals
        ("1st 2nd 3rd 4th", "first second third fourth"),
        ("5th 8th 9th 12th", "fifth eighth ninth twelfth"),
        ("11th 20th 21st 22nd 23rd", "eleventh twentieth twenty first twenty second twenty third"),
        ("100th 1000000th", "one hundredth one millionth"),
        ("2ND", "second"),
        # plurals
        ("the 1990s", "the one thousand nine hundred nineties"),
        ("the 80's", "the eighties"),
        # currency
        ("$5", "five dollars"),
        ("$1", "one dollar"),
        ("$1.50", "one dollar fifty cents"),
        ("$0.99", "ninety nine cents"),
        ("$2.5", "two point five dollars"),
        ("$5 million", "five million dollars"),
        ("£2.01", "two pounds one penny"),
        ("€3", "three euros"),
        # digits stuck to letters or punctuation
        ("mp3 4x4", "mp three four x four"),
        ("10:30", "ten thirty"),
        ("number 3.", "number three"),
        ("٣٤", "thirty four"),
    ],
)
def test_numbers(raw: str, expected: str) -> None:
    assert normalize_transcript(raw) == expected


def test_charset() -> None:
    assert len(CHARSET) == 28
    assert set(CHARSET) == set("abcdefghijklmnopqrstuvwxyz' ")


_texts = st.text(
    st.one_of(
        st.characters(),
        st.sampled_from("0123456789.,-$£€%&'’ "),
        st.sampled_from("abcXYZé"),
    ),
    max_size=60,
)


@given(_texts)
def test_output_is_in_charset(text: str) -> None:
    out = normalize_transcript(text)
    assert set(out) <= set(CHARSET)
    assert "  " not in out
    assert out == out.strip()


@given(_texts)
def test_idempotent(text: str) -> None:
    once = normalize_transcript(text)
    assert normalize_transcript(once) == once


@given(_texts)
def test_apostrophes_only_inside_words(text: str) -> None:
    out = normalize_transcript(text)
    for i, c in enumerate(out):
        if c == "'":
            assert 0 < i < len(out) - 1 and out[i - 1].isalpha() and out[i + 1].isalpha()


_SMALL = (  # noqa: SIM905
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_VALUES = {w: i for i, w in enumerate(_SMALL)}
_VALUES |= {
    w: 10 * i
    for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)
}
_SCALES = {
    w: 1000**i
    for i, w in enumerate(["thousand", "million", "billion", "trillion", "quadrillion", "quintillion"], 1)
}


def _words_to_int(words: str) -> int:
    """Independent reader of the spelled-out cardinals, to check `normalize_transcript` against."""
    tokens = words.split()
    sign = -1 if tokens[0] == "minus" else 1
    total = current = 0
    for w in tokens[1:] if sign < 0 else tokens:
        if w == "hundred":
            current *= 100
        elif w in _SCALES:
            total, current = total + current * _SCALES[w], 0
        else:
            current += _VALUES[w]
    return sign * (total + current)


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_integers_are_spelled_in_words(n: int) -> None:
    for raw in (str(n), f"{n:,}"):
        assert _words_to_int(normalize_transcript(raw)) == n
