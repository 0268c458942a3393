"""`gharial data ngram`: the pure-Python Kneser-Ney estimator, read back with KenLM."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import kenlm
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gharial.asr.decoding.lm import NgramLM
from gharial.cli.data import app
from gharial.data.ngram import _adjusted_counts, build_arpa

from .conftest import sentences

CORPUS = ["The cat sat.", "the cat ran", "A dog sat!"]  # normalised: the cat sat / the cat ran / a dog sat


@contextmanager
def kenlm_model(arpa: str, tmp: Path) -> Iterator[kenlm.Model]:
    path = tmp / "lm.arpa"
    path.write_text(arpa)
    config = kenlm.Config()
    config.show_progress = False
    yield kenlm.Model(str(path), config)
    path.unlink()


def header_counts(arpa: str) -> dict[int, int]:
    return {
        int(n): int(c) for n, c in (ln[6:].split("=") for ln in arpa.splitlines() if ln.startswith("ngram "))
    }


def vocabulary(arpa: str) -> list[str]:
    """Every word the model can predict: the unigrams but <s> (</s> and <unk> included)."""
    section = arpa.split("\\1-grams:\n")[1].split("\n\n")[0]
    return [line.split("\t")[1] for line in section.splitlines() if line.split("\t")[1] != "<s>"]


def state_after(model: kenlm.Model, words: list[str]) -> kenlm.State:
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for word in words:
        out = kenlm.State()
        model.BaseScore(state, word, out)
        state = out
    return state


def next_word_mass(model: kenlm.Model, context: list[str], vocab: list[str]) -> float:
    state = state_after(model, context)
    return sum(10 ** model.BaseScore(state, word, kenlm.State()) for word in vocab)


def test_counts_by_hand() -> None:
    arpa = build_arpa(CORPUS, order=3)
    # unigrams: the cat sat ran a dog + </s> <s> <unk>; bigrams: <s> the, the cat, cat sat, sat </s>,
    # cat ran, ran </s>, <s> a, a dog, dog sat; trigrams: <s> the cat, the cat sat, cat sat </s>,
    # the cat ran, cat ran </s>, <s> a dog, a dog sat, dog sat </s>
    assert header_counts(arpa) == {1: 9, 2: 9, 3: 8}
    assert header_counts(build_arpa(CORPUS, order=2)) == {1: 9, 2: 9}
    counts = _adjusted_counts(CORPUS, 3)
    assert counts[2][("<s>", "the", "cat")] == 2  # highest order: raw counts
    assert counts[1][("<s>", "the")] == 2  # starts with <s>: raw count
    assert counts[1][("sat", "</s>")] == 2  # continuation: after "cat" and "dog"
    assert counts[0][("sat",)] == 2 and counts[0][("cat",)] == 1 and counts[0][("<unk>",)] == 0
    assert ("<s>",) not in counts[0]


def test_probability_by_hand(tmp_path: Path) -> None:
    """p(ran | the cat) worked out on paper. Every order has too few counts of counts for modified
    Kneser-Ney, so each uses one discount n1 / (n1 + 2 n2)."""
    # unigram continuation counts: the 1, cat 1, sat 2, ran 1, a 1, dog 1, </s> 2, <unk> 0 (total 9)
    d1 = 5 / (5 + 2 * 2)
    gamma1 = 7 * d1 / 9
    p1 = (1 - d1) / 9 + gamma1 / 8  # interpolated with the uniform distribution over 8 words
    # bigram counts: <s> the 2 (raw), every other bigram 1 but sat </s> 2; context "cat": sat, ran
    d2 = 7 / (7 + 2 * 2)
    p2 = (1 - d2) / 2 + (2 * d2 / 2) * p1
    # trigram counts: <s> the cat 2, the other 7 are 1; context "the cat": sat, ran
    d3 = 7 / (7 + 2 * 1)
    p3 = (1 - d3) / 2 + (2 * d3 / 2) * p2
    with kenlm_model(build_arpa(CORPUS, order=3), tmp_path) as model:
        scores = [s for s, _, _ in model.full_scores("the cat ran")]
    assert 10 ** scores[2] == pytest.approx(p3, abs=1e-5)


def test_loads_with_kenlm_and_ngram_lm(tmp_path: Path) -> None:
    arpa = build_arpa(sentences(50), order=3)
    lm = NgramLM.from_bytes(arpa.encode())
    assert lm.order == 3
    state, delta = lm.advance(lm.begin(), "▁the")
    assert delta == 0.0 and math.isfinite(lm.finish(state))
    with kenlm_model(arpa, tmp_path) as model:
        assert model.order == 3
        assert "fox" in model and "zebra" not in model


@pytest.mark.parametrize(("order", "min_count", "discount"), [(2, 1, None), (3, 1, None), (4, 1, None),
                                                              (3, 2, None), (3, 1, 0.7)])  # fmt: skip
def test_probabilities_normalise(tmp_path: Path, order: int, min_count: int, discount: float | None) -> None:
    texts = [*sentences(300), *CORPUS, "", "a lazy dog jumps over the quick brown fox"]
    arpa = build_arpa(texts, order=order, min_count=min_count, discount=discount)
    vocab = vocabulary(arpa)
    contexts = [[], ["the"], ["the", "quick"], ["the", "quick", "brown"], ["can't", "vex"], ["zebra"],
                ["fox", "zebra"], ["jumps", "over", "a"], ["sphinx", "the", "cat"]]  # fmt: skip
    with kenlm_model(arpa, tmp_path) as model:
        for context in contexts:
            assert next_word_mass(model, context, vocab) == pytest.approx(1.0, abs=1e-4), context


def test_seen_trigram_beats_unseen(tmp_path: Path) -> None:
    with kenlm_model(build_arpa(CORPUS, order=3), tmp_path) as model:
        state = state_after(model, ["the", "cat"])
        seen = model.BaseScore(state, "sat", kenlm.State())  # "the cat sat"
        unseen = model.BaseScore(state, "dog", kenlm.State())  # "the cat dog": dog is a known word
        assert seen > unseen
        assert model.score("the cat sat") > model.score("the dog sat")  # "the dog" never seen


def test_deterministic() -> None:
    texts = sentences(200, seed=3)
    arpa = build_arpa(texts, order=3)
    assert build_arpa(list(texts), order=3) == arpa
    # and in another process, whose string hashes (and so any set order) differ
    code = "import sys; from gharial.data.ngram import build_arpa; print(build_arpa(sys.argv[1:]), end='')"
    other = subprocess.run(
        [sys.executable, "-c", code, *texts], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )  # fmt: skip
    assert other.stdout == arpa


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="order"):
        build_arpa(CORPUS, order=1)
    with pytest.raises(ValueError, match="discount"):
        build_arpa(CORPUS, discount=0.0)
    with pytest.raises(ValueError, match="no text"):
        build_arpa([])


def test_cli_reads_manifests_and_text_and_excludes(tmp_path: Path) -> None:
    def manifest(path: Path, transcripts: list[str]) -> Path:
        entries = [
            {"transcript": t, "files": [{"fname": f"{i}.wav", "duration": 1.0}]}
            for i, t in enumerate(transcripts)
        ]
        path.write_text(json.dumps(entries))
        return path

    train = manifest(tmp_path / "train.json", ["The cat sat.", "Seven wizards!"])
    dev = manifest(tmp_path / "dev.json", ["seven WIZARDS"])
    text = tmp_path / "extra.txt"
    text.write_text("a dog ran\n\n  \nthe dog sat\nThe cat sat\n")
    out = tmp_path / "lm.arpa"
    args = ["ngram", str(train), str(text), "--order", "2", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--exclude-manifest", str(dev)])
    assert result.exit_code == 0, result.output
    assert "from 3 sentences of 5" in result.output  # one excluded, one repeat counted once
    arpa = out.read_text()
    assert arpa == build_arpa(["the cat sat", "a dog ran", "the dog sat"], order=2)
    assert "wizards" not in arpa
    assert CliRunner().invoke(app, args).exit_code == 0
    assert "seven wizards" in out.read_text()  # without the exclusion
    assert CliRunner().invoke(app, [*args, "--no-unique"]).exit_code == 0
    assert out.read_text() == build_arpa(
        ["the cat sat", "seven wizards", "a dog ran", "the dog sat", "the cat sat"], order=2
    )
    bad = CliRunner().invoke(app, ["ngram", str(tmp_path / "missing.json"), "-o", str(out)])
    assert bad.exit_code == 2 and "manifest not found" in bad.output


WORDS = st.sampled_from(["the", "a", "cat", "dog", "can't", "o'clock", "sat", "x"]) | st.from_regex(
    r"[a-z]{1,8}('[a-z]{1,3})?", fullmatch=True
)
SENTENCE = st.lists(WORDS, max_size=7).map(" ".join)


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(SENTENCE, min_size=1, max_size=12),
    order=st.integers(2, 4),
    min_count=st.integers(1, 2),
)
def test_any_sentences_give_a_loadable_model(
    texts: list[str], order: int, min_count: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    arpa = build_arpa(texts, order=order, min_count=min_count)
    assert NgramLM.from_bytes(arpa.encode()).order == order
    vocab = vocabulary(arpa)
    with kenlm_model(arpa, tmp_path_factory.mktemp("lm")) as model:
        for text in [*texts, "zebra " + texts[0], "the the the"]:
            assert all(math.isfinite(s) and s <= 0 for s, _, _ in model.full_scores(text)), text
        first_words = texts[0].split()[: order - 1]
        for context in ([], first_words):
            assert next_word_mass(model, context, vocab) == pytest.approx(1.0, abs=1e-4)
