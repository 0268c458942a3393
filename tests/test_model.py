"""Model configs and shapes: the CAIMAN-ASR parameter counts, and a stepped encoder equals a whole one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gharial.asr.config import ModelConfig, load_model_config
from gharial.asr.model import RNNT, count_parameters

GHARIAL = Path(sys.executable).parent / "gharial"


@pytest.mark.parametrize(
    ("name", "params"), [("testing", 49_006_080), ("base", 84_690_432), ("large", 195_590_400)]
)
def test_reference_parameter_counts(name: str, params: int) -> None:
    assert count_parameters(RNNT(load_model_config(name))) == params


def test_model_info_cli_prints_exact_count() -> None:
    out = subprocess.run(
        [GHARIAL, "model", "info", "--config", "base", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["params"] == 84690432
    assert info["vocab_size"] == 8703 and info["blank_id"] == 8703
    assert sum(info["components"].values()) == info["params"]


def test_model_info_table_and_errors() -> None:
    table = subprocess.run([GHARIAL, "model", "info", "--config", "large"], capture_output=True, text=True)
    assert "195,590,400 parameters" in table.stdout
    bad = subprocess.run([GHARIAL, "model", "info", "--config", "huge"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "unknown model config 'huge'" in bad.stderr


def test_config_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "vocab_size": 40, "encoder": {"hidden": 32}}))
    assert load_model_config(path).encoder.hidden == 32
    path.write_text(yaml.safe_dump({"name": "mine", "vocab_size": 40, "encodr": {"hidden": 32}}))
    with pytest.raises(ValueError, match="encodr"):
        load_model_config(path)


def test_config_must_tile_60ms_frames() -> None:
    with pytest.raises(ValueError, match="must make one 60 ms frame"):
        ModelConfig(name="x", vocab_size=10, features={"hop_ms": 20.0})  # type: ignore[arg-type]


def test_stepped_encoder_equals_whole_utterance(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = RNNT(tiny_config).eval()
    features = torch.randn(3, 20, tiny_config.features.feature_dim)
    whole, final_state = model.encoder(features)
    state = model.encoder.initial_state(3)
    steps = []
    for t in range(0, 20, 2):
        out, state = model.encoder(features[:, t : t + 2], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.post.h, final_state.post.h, atol=1e-5, rtol=0)


def test_training_lattice_shape_and_sos(tiny_config: ModelConfig) -> None:
    model = RNNT(tiny_config)
    logits = model(torch.randn(2, 8, tiny_config.features.feature_dim), torch.randint(0, 31, (2, 5)))
    assert logits.shape == (2, 4, 6, tiny_config.vocab_size + 1)
    sos = torch.full((1, 1), model.blank_id)
    out, _ = model.predictor(sos)
    zero_input, _ = model.predictor.rnn(torch.zeros(1, 1, tiny_config.predictor.hidden))
    torch.testing.assert_close(out, zero_input)  # blank/SOS embeds to zeros


def test_dropout_acts_in_training_only(tiny_config: ModelConfig) -> None:
    """Dropout changes the training lattice from call to call, never the eval model's output, and
    adds no parameters (checkpoints with and without it load into each other)."""
    config = tiny_config.model_copy(
        update={
            "encoder": tiny_config.encoder.model_copy(update={"dropout": 0.3}),
            "predictor": tiny_config.predictor.model_copy(update={"dropout": 0.3}),
        }
    )
    torch.manual_seed(0)
    model = RNNT(config)
    plain = RNNT(tiny_config)
    plain.load_state_dict(model.state_dict())  # same parameters, strict load
    features = torch.randn(2, 8, config.features.feature_dim)
    targets = torch.randint(0, 31, (2, 5))
    first, second = model(features, targets), model(features, targets)
    assert not torch.allclose(first, second)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(features, targets), plain(features, targets))
    torch.testing.assert_close(model(features, targets), model(features, targets))


def test_dropout_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(name="x", vocab_size=10, encoder={"dropout": 1.0})  # type: ignore[arg-type]


def test_dropout_is_not_part_of_the_weights(tiny_config: ModelConfig) -> None:
    """Fine-tuning may add dropout to an exported model; any other change is another architecture."""
    with_dropout = tiny_config.model_copy(
        update={"predictor": tiny_config.predictor.model_copy(update={"dropout": 0.2})}
    )
    wider = tiny_config.model_copy(
        update={"joint": tiny_config.joint.model_copy(update={"hidden": tiny_config.joint.hidden + 1})}
    )
    assert with_dropout != tiny_config
    assert with_dropout.same_weights_as(tiny_config)
    assert not wider.same_weights_as(tiny_config)
