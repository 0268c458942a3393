"""The card profile: the hardware constants the timing model turns a program's instructions into time with.

A profile describes one accelerator card, not one model: the same profile prices `base`, `large` or
any other program, so capacities differ only because the programs differ. Every constant of the
default profile (`profiles/speedster7t.yaml`) says where it comes from, datasheet or fit.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "speedster7t"


class CardProfile(BaseModel):
    """One accelerator card (DESIGN §4). Cycles are at `clock_mhz`; bandwidths are bytes per second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    clock_mhz: float = Field(gt=0, description="clock of the MAC array and the sequencer")
    mac_rows: int = Field(gt=0, description="MAC array tile height: weight rows per cycle")
    mac_cols: int = Field(gt=0, description="MAC array tile width: weight columns (inputs) per cycle")
    mac_utilisation: float = Field(
        gt=0, le=1, description="fraction of the MAC array's peak a matvec sustains (fitted)"
    )
    vector_lanes: int = Field(gt=0, description="float32 element-wise operations per cycle")
    on_chip_weight_bytes: int = Field(ge=0, description="on-chip memory that can hold weights")
    off_chip_bytes_per_s: float = Field(gt=0, description="bandwidth of the weight memory (GDDR6)")
    state_memory_bytes: int = Field(gt=0, description="per-stream state capacity: sets the max streams")
    state_bytes_per_s: float = Field(gt=0, description="bandwidth of the state memory")
    pcie_bytes_per_s: float = Field(gt=0, description="host link bandwidth for features in and tokens out")
    batch_overhead_cycles: int = Field(ge=0, description="fixed cost of every batch (fitted)")
    kernel_launch_cycles: int = Field(ge=0, description="cost of each kernel launch in a batch")
    host_overhead_ms: float = Field(
        ge=0, description="host time per frame outside the card (features, decoding, reply; fitted)"
    )
    tokens_per_frame: float = Field(
        ge=0, description="mean tokens a stream emits per 60 ms frame (timing-only)"
    )

    @property
    def macs_per_cycle(self) -> int:
        return self.mac_rows * self.mac_cols

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6


def named_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> CardProfile:
    """A named profile (`speedster7t`) or a YAML file with the same schema."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown card profile {name_or_path!r}; named profiles: {named_profiles()}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return CardProfile.model_validate(data)
