"""The card profile and the cycle-approximate timing model: prices follow the program's instructions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gharial.accelerator.capacity import max_rts, simulate
from gharial.accelerator.layout import lower
from gharial.accelerator.profile import CardProfile, load_profile
from gharial.accelerator.timing import TimingModel
from gharial.asr.config import ModelConfig, load_model_config


@pytest.fixture(scope="module")
def profile() -> CardProfile:
    return load_profile()


@pytest.fixture(scope="module")
def base(profile: CardProfile) -> TimingModel:
    return TimingModel(profile, lower(load_model_config("base")))


def timing(profile: CardProfile, cfg: ModelConfig, **changes: object) -> TimingModel:
    return TimingModel(profile.model_copy(update=changes), lower(cfg))


def test_named_and_file_profiles_load_and_unknown_keys_are_rejected(tmp_path: Path) -> None:
    card = load_profile("speedster7t")
    assert card.macs_per_cycle == 2560 * 16  # 2,560 MLPs x 32 int8 multipliers, two per int16 product
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card.model_dump() | {"name": "copy"}))
    assert load_profile(path) == card.model_copy(update={"name": "copy"})
    path.write_text(yaml.safe_dump(card.model_dump() | {"dsp_blocks": 4}))
    with pytest.raises(ValidationError):
        load_profile(path)
    with pytest.raises(ValueError, match="unknown card profile"):
        load_profile("no-such-card")


def test_cycles_grow_with_streams(base: TimingModel) -> None:
    cycles = [base.batch(b, b + b // 5, b // 5).cycles for b in (1, 2, 8, 32, 128, 512, 2048)]
    assert cycles == sorted(cycles) and len(set(cycles)) == len(cycles)


def test_breakdown_sums_to_total(base: TimingModel) -> None:
    t = base.batch(300, 370, 70, rounds=3)
    parts = (
        t.compute_cycles,
        t.weight_cycles,
        t.state_cycles,
        t.vector_cycles,
        t.transfer_cycles,
        t.overhead_cycles,
    )
    assert all(p > 0 for p in parts)
    assert sum(parts) == t.cycles
    assert t.seconds == pytest.approx(t.cycles / (base.profile.clock_mhz * 1e6))
    assert t.ms == pytest.approx(1000 * t.seconds)


def test_batches_switch_from_weight_streaming_to_compute_bound(profile: CardProfile) -> None:
    """Small batches wait for the weights that do not fit on chip, large ones for the MACs."""
    model = timing(profile, load_model_config("base"), batch_overhead_cycles=0)
    small, large = model.batch(1, 1, 0), model.batch(512, 512, 0)
    assert small.bound == "weights" and small.weight_cycles > small.compute_cycles
    assert large.bound == "compute" and large.weight_cycles == 0
    # the streamed weights cost the same at any batch size, so they are the floor of small batches
    assert model.batch(2, 2, 0).weight_cycles == small.weight_cycles


def test_joint_and_predictor_stay_on_chip_and_the_rest_streams(base: TimingModel) -> None:
    assert {"joint.out", "joint.pred_proj", "predictor.rnn.0.w_ih"} <= base.resident
    assert "encoder.post.0.w_ih" not in base.resident
    weights = [t for t in base.layout.tensors if t.role == "weight"]
    streamed = sum(t.nbytes for t in weights if t.name not in base.resident)
    assert streamed > base.layout.weight_bytes - base.profile.on_chip_weight_bytes


def test_everything_on_chip_removes_weight_streaming(profile: CardProfile) -> None:
    cfg = load_model_config("base")
    roomy = timing(profile, cfg, on_chip_weight_bytes=10**9)
    tight = timing(profile, cfg, on_chip_weight_bytes=0)
    assert roomy.batch(1, 1, 0).weight_cycles < tight.batch(1, 1, 0).weight_cycles / 100
    assert roomy.batch(1, 1, 0).cycles < tight.batch(1, 1, 0).cycles


def test_decoding_work_costs_joint_and_predictor_evaluations(base: TimingModel) -> None:
    silent = base.batch(100, 100, 0)
    talking = base.batch(100, 150, 50, rounds=2)
    assert talking.cycles > silent.cycles
    with pytest.raises(ValueError, match="rounds"):
        base.batch(100, 150, 50, rounds=1)


def test_a_bigger_program_predicts_lower_capacity(profile: CardProfile) -> None:
    """Same card, same profile: only the program changes, and capacity moves with its size."""
    cfg = load_model_config("testing")
    wider = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"hidden": 1536})})
    small, big = TimingModel(profile, lower(cfg)), TimingModel(profile, lower(wider))
    assert big.batch(256, 300, 44).cycles > small.batch(256, 300, 44).cycles
    small_rts = max_rts(small, seconds=1.0, resolution=0.03)
    big_rts = max_rts(big, seconds=1.0, resolution=0.03)
    assert small_rts is not None and big_rts is not None
    assert big_rts.streams < 0.8 * small_rts.streams


def test_state_memory_caps_max_streams(profile: CardProfile) -> None:
    cfg = load_model_config("testing")
    per_stream = TimingModel(profile, lower(cfg)).state_bytes_per_stream()
    small = timing(profile, cfg, state_memory_bytes=100 * per_stream + per_stream // 2)
    assert small.max_streams() == 100
    assert small.state_bytes_per_stream(beam=4) > per_stream
    assert small.max_streams(beam=4) < 100
    best = max_rts(small, cards=2, seconds=1.0)
    assert best is not None and best.streams == 200  # compute would allow thousands
    with pytest.raises(ValueError, match="state memory"):
        simulate(small, 201, cards=2, seconds=1.0)
