"""Hardware checkpoints: a round trip keeps everything bit-exact, and every way a file can be wrong or
corrupt fails with a CheckpointError that says what is wrong and names the file."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gharial.asr.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    HardwareCheckpoint,
    HardwareCheckpointMeta,
    compute_checksum,
)
from gharial.asr.config import ModelConfig
from gharial.asr.features import MelStats
from gharial.asr.model import RNNT
from gharial.asr.tokenizer import train_tokenizer

from .conftest import sentences

ARPA = b"\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\n-0.5\t</s>\n-0.3\thello\n\n\\end\\\n"


@pytest.fixture(scope="module")
def cfg(tiny_config: ModelConfig) -> ModelConfig:
    return tiny_config


@pytest.fixture(scope="module")
def spm_bytes(tiny_tokenizer_bytes: bytes) -> bytes:
    return tiny_tokenizer_bytes


@pytest.fixture
def model(cfg: ModelConfig) -> RNNT:
    torch.manual_seed(0)
    return RNNT(cfg)


@pytest.fixture
def mel_stats(cfg: ModelConfig) -> MelStats:
    n = cfg.features.n_mels
    return MelStats(mean=[0.1 * i for i in range(n)], var=[1.0 + 0.01 * i for i in range(n)])


@pytest.fixture
def ckpt(model: RNNT, mel_stats: MelStats, spm_bytes: bytes) -> HardwareCheckpoint:
    return HardwareCheckpoint.from_model(
        model, mel_stats, spm_bytes, ngram_lm=ARPA, training_step=1234, source="runs/x/step1234.pt"
    )


@pytest.fixture
def saved(ckpt: HardwareCheckpoint, tmp_path: Path) -> Path:
    path = tmp_path / "model.hwckpt"
    ckpt.save(path)
    return path


def rewrite(path: Path, change: Callable[[dict[str, Any], dict[str, Any]], object]) -> None:
    """Edit a saved file's raw dict and meta (as JSON-ready dict), then store it with a *valid* checksum,
    so the check under test is the one that fires rather than the checksum."""
    contents = torch.load(path, weights_only=True)
    meta = json.loads(contents["meta"])
    change(contents, meta)
    contents["meta"] = json.dumps(meta)
    contents["checksum"] = compute_checksum(
        meta, contents["state_dict"], contents["tokenizer_model"], contents["ngram_lm"]
    )
    torch.save(contents, path)


def features_and_targets(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8 * cfg.features_per_frame, cfg.features.feature_dim, generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
    return features, targets


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip(ckpt: HardwareCheckpoint, model: RNNT, saved: Path) -> None:
    loaded = HardwareCheckpoint.load(saved)
    assert loaded.meta == ckpt.meta
    assert loaded.meta.format_version == FORMAT_VERSION
    assert loaded.meta.has_ngram_lm and loaded.meta.training_step == 1234
    assert loaded.ngram_lm == ARPA
    assert loaded.tokenizer_model == ckpt.tokenizer_model
    assert loaded.state_dict.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict[name], tensor), name
    assert loaded.checksum == ckpt.checksum == torch.load(saved, weights_only=True)["checksum"]

    built = loaded.build_model()
    assert not built.training
    features, targets = features_and_targets(model.cfg)
    with torch.no_grad():
        assert torch.equal(built(features, targets), model.eval()(features, targets))


def test_round_trip_without_lm(model: RNNT, mel_stats: MelStats, spm_bytes: bytes, tmp_path: Path) -> None:
    ckpt = HardwareCheckpoint.from_model(model, mel_stats, spm_bytes)
    ckpt.save(tmp_path / "m.pt")
    loaded = HardwareCheckpoint.load(tmp_path / "m.pt")
    assert loaded.ngram_lm is None and not loaded.meta.has_ngram_lm
    assert loaded.meta.training_step is None and loaded.meta.notes is None
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temp file left behind


def test_from_model_copies_to_cpu_float32(model: RNNT, mel_stats: MelStats, spm_bytes: bytes) -> None:
    ckpt = HardwareCheckpoint.from_model(model.double(), mel_stats, spm_bytes)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ckpt.state_dict.values())
    before = ckpt.state_dict["joint.out.bias"].clone()
    with torch.no_grad():
        model.joint.out.bias.add_(1.0)  # training goes on; the snapshot must not move
    assert torch.equal(ckpt.state_dict["joint.out.bias"], before)


def test_meta_schema(ckpt: HardwareCheckpoint) -> None:
    import gharial

    meta = HardwareCheckpointMeta.model_validate_json(ckpt.meta.model_dump_json())
    assert meta == ckpt.meta
    assert meta.format == "gharial-hardware-checkpoint"
    assert meta.gharial_version == gharial.__version__
    assert meta.source == "runs/x/step1234.pt"


def test_checksum_tracks_contents(ckpt: HardwareCheckpoint) -> None:
    before = ckpt.checksum
    assert len(before) == 64 and before == ckpt.checksum
    changed = dataclasses.replace(ckpt, ngram_lm=ARPA + b"\n")
    assert changed.checksum != before


# --- files that are not hardware checkpoints ----------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        HardwareCheckpoint.load(tmp_path / "nope.pt")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a file"):
        HardwareCheckpoint.load(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: empty file"):
        HardwareCheckpoint.load(tmp_path / "empty.pt")


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.hwckpt: truncated or corrupt torch file"):
        HardwareCheckpoint.load(saved)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match=r"noise\.bin: (not a torch file|truncated or corrupt)"):
        HardwareCheckpoint.load(path)


def test_arbitrary_dict(tmp_path: Path) -> None:
    torch.save({"foo": 1}, tmp_path / "foo.pt")
    with pytest.raises(
        CheckpointError, match=r"foo\.pt: not a hardware checkpoint: found a dict with keys \['foo'\]"
    ):
        HardwareCheckpoint.load(tmp_path / "foo.pt")


def test_not_a_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="not a hardware checkpoint: found a Tensor, not a dict"):
        HardwareCheckpoint.load(tmp_path / "t.pt")


def test_training_checkpoint(model: RNNT, tmp_path: Path) -> None:
    optimizer = torch.optim.Adam(model.parameters())
    training = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save({**training, "step": 10}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match=r"not a hardware checkpoint.*looks like a training checkpoint"):
        HardwareCheckpoint.load(tmp_path / "train.pt")


@dataclasses.dataclass
class Pickled:
    x: int


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    torch.save({"meta": Pickled(1)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"holds Python objects \(.*Pickled\).*weights_only"):
        HardwareCheckpoint.load(tmp_path / "obj.pt")


def test_missing_entries(saved: Path) -> None:
    contents = torch.load(saved, weights_only=True)
    del contents["ngram_lm"]
    torch.save(contents, saved)
    with pytest.raises(CheckpointError, match=r"hardware checkpoint lacks \['ngram_lm'\]"):
        HardwareCheckpoint.load(saved)


def test_unknown_entries(saved: Path) -> None:
    contents = torch.load(saved, weights_only=True)
    torch.save({**contents, "optimizer": {}}, saved)
    with pytest.raises(CheckpointError, match=r"hardware checkpoint has unknown entries \['optimizer'\]"):
        HardwareCheckpoint.load(saved)


def test_meta_not_json(saved: Path) -> None:
    contents = torch.load(saved, weights_only=True)
    torch.save({**contents, "meta": contents["meta"][:-3]}, saved)
    with pytest.raises(CheckpointError, match="meta is not valid JSON"):
        HardwareCheckpoint.load(saved)


# --- format and version -------------------------------------------------------------------------


def test_wrong_format_name(saved: Path) -> None:
    rewrite(saved, lambda c, m: m.update(format="gharial-program"))
    with pytest.raises(CheckpointError, match=r"model\.hwckpt: wrong format 'gharial-program'"):
        HardwareCheckpoint.load(saved)


def test_newer_format_version(saved: Path) -> None:
    rewrite(saved, lambda c, m: m.update(format_version=FORMAT_VERSION + 1, gharial_version="9.9.9"))
    with pytest.raises(
        CheckpointError, match=r"format version 2 was written by a newer gharial \(9\.9\.9\).*versions \[1\]"
    ):
        HardwareCheckpoint.load(saved)


def test_older_format_version(saved: Path) -> None:
    rewrite(saved, lambda c, m: m.update(format_version=0))
    with pytest.raises(CheckpointError, match=r"unsupported format version 0.*reads format versions \[1\]"):
        HardwareCheckpoint.load(saved)


def test_invalid_meta(saved: Path) -> None:
    def change(c: dict[str, Any], m: dict[str, Any]) -> None:
        del m["config"]["vocab_size"]
        m["mel_stats"]["var"][0] = -1.0

    rewrite(saved, change)
    with pytest.raises(CheckpointError, match=r"invalid meta: config\.vocab_size: Field required; mel_stats"):
        HardwareCheckpoint.load(saved)


def test_unknown_meta_field(saved: Path) -> None:
    rewrite(saved, lambda c, m: m.update(colour="green"))
    with pytest.raises(CheckpointError, match="invalid meta: colour: Extra inputs are not permitted"):
        HardwareCheckpoint.load(saved)


# --- corruption ---------------------------------------------------------------------------------


def test_checksum_mismatch_in_weights(saved: Path) -> None:
    contents = torch.load(saved, weights_only=True)
    contents["state_dict"]["encoder.pre_rnn.weight_ih_l0"][0, 0] += 1e-3
    torch.save(contents, saved)
    with pytest.raises(CheckpointError, match=r"model\.hwckpt: checksum mismatch.*corrupt"):
        HardwareCheckpoint.load(saved)


def test_checksum_mismatch_in_meta_and_bytes(saved: Path) -> None:
    original = torch.load(saved, weights_only=True)
    meta = json.loads(original["meta"])
    meta["training_step"] = 99
    for contents in ({**original, "meta": json.dumps(meta)}, {**original, "ngram_lm": ARPA[:-1]}):
        torch.save(contents, saved)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            HardwareCheckpoint.load(saved)


# --- contents that disagree with the config -----------------------------------------------------


def test_missing_weights(saved: Path) -> None:
    rewrite(saved, lambda c, m: c["state_dict"].pop("joint.out.bias"))
    with pytest.raises(
        CheckpointError, match=r"weights do not match config 'tiny': 1 missing keys \['joint\.out\.bias'\]"
    ):
        HardwareCheckpoint.load(saved)


def test_unexpected_weights(saved: Path) -> None:
    rewrite(saved, lambda c, m: c["state_dict"].update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"weights do not match config 'tiny': 1 unexpected keys \['extra"
    ):
        HardwareCheckpoint.load(saved)


def test_wrong_shape(saved: Path) -> None:
    rewrite(saved, lambda c, m: c["state_dict"].update({"joint.out.bias": torch.zeros(40)}))
    with pytest.raises(
        CheckpointError, match=r"'joint\.out\.bias' has shape \[40\] but config 'tiny' needs \[32\]"
    ):
        HardwareCheckpoint.load(saved)


def test_wrong_dtype(saved: Path) -> None:
    rewrite(
        saved, lambda c, m: c["state_dict"].update({"joint.out.bias": torch.zeros(32, dtype=torch.float64)})
    )
    with pytest.raises(CheckpointError, match=r"'joint\.out\.bias' is torch\.float64"):
        HardwareCheckpoint.load(saved)


def test_mel_stats_mismatch(saved: Path) -> None:
    rewrite(saved, lambda c, m: m.update(mel_stats=MelStats.identity(80).model_dump()))
    with pytest.raises(CheckpointError, match="mel stats have 80 bins, config 'tiny' has n_mels=40"):
        HardwareCheckpoint.load(saved)


def test_lm_flag_mismatch(saved: Path) -> None:
    rewrite(saved, lambda c, m: c.update(ngram_lm=None))
    with pytest.raises(CheckpointError, match="has_ngram_lm=True but the n-gram LM is absent"):
        HardwareCheckpoint.load(saved)


def test_bad_tokenizer_bytes(saved: Path) -> None:
    rewrite(saved, lambda c, m: c.update(tokenizer_model=b"definitely not a protobuf"))
    with pytest.raises(CheckpointError, match=r"model\.hwckpt: tokenizer model \(25 bytes\) is invalid"):
        HardwareCheckpoint.load(saved)


def test_tokenizer_vocab_mismatch(saved: Path, tmp_path: Path) -> None:
    other = train_tokenizer(sentences(400), 36, tmp_path / "spm36").read_bytes()
    rewrite(saved, lambda c, m: c.update(tokenizer_model=other))
    with pytest.raises(
        CheckpointError, match="tokenizer vocabulary has 36 pieces but config 'tiny' has vocab_size=31"
    ):
        HardwareCheckpoint.load(saved)


# --- save refuses to write invalid checkpoints --------------------------------------------------


def test_save_validates(ckpt: HardwareCheckpoint, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    bad_cases = [
        dataclasses.replace(ckpt, tokenizer_model=b"junk"),
        dataclasses.replace(
            ckpt, state_dict={k: v for k, v in ckpt.state_dict.items() if k != "joint.out.weight"}
        ),
        dataclasses.replace(ckpt, meta=ckpt.meta.model_copy(update={"mel_stats": MelStats.identity(80)})),
        dataclasses.replace(ckpt, ngram_lm=b""),
    ]
    for bad in bad_cases:
        with pytest.raises(CheckpointError, match=r"bad\.pt: "):
            bad.save(path)
        assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file
