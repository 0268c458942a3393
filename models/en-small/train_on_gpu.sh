#!/usr/bin/env bash
# Train en-small on a lent GPU machine within a time budget, and leave what must come back in $OUT:
# the slim checkpoint (EMA weights, `TrainingCheckpoint.slim`) in pieces under 16 MiB, the step log
# and the resolved run config. Needs the packed corpus (`make pack`) in data/packed/, and, where the
# machine's Python lacks them, wheels in .whl/ (pydantic, soundfile and what they need; for the H200
# image's Python 3.12: pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
# typing-inspection==0.4.5 typing_extensions soundfile==0.14.0 cffi==2.1.1 pycparser==3.12, fetched
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
# --platform manylinux2014_x86_64 --platform any -d .whl ...`).
# Usage: models/en-small/train_on_gpu.sh [BUDGET_SECONDS]   (default 420; CONFIG=... for another recipe)
# Back here: cat en-small-slim.pt.part-* > slim.pt && gharial export slim.pt -o models/en-small/en-small.hwckpt
set -euo pipefail
budget=${1:-420}
config=${CONFIG:-models/en-small/train-gpu.yaml}
wheels=${WHEELS:-.whl}
out=${OUT:-runs/en-small-gpu/out}
run=runs/en-small-gpu
mkdir -p "$out" "$run"
status=0  # the trainer's; whatever it saved still comes back when it fails
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/libs${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# (python -c, not a here-document: the data workers are spawned and re-import the main module)
python3 -c '
import sys
from pathlib import Path

import torch

from gharial.cli.train import train

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
train(config=Path(sys.argv[3]), run_dir=Path(sys.argv[2]), steps=None, profile=0, time_budget=float(sys.argv[1]))
' "$budget" "$run" "$config" || status=$?
python3 - "$run" "$out" <<'PY'
import sys
from pathlib import Path

from gharial.training.checkpoint import TrainingCheckpoint

run, out = Path(sys.argv[1]), Path(sys.argv[2])
latest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
TrainingCheckpoint.load(latest).slim().save(out / "en-small-slim.pt")
print(f"slim checkpoint of {latest.name}")
PY
(cd "$out" && split -b 15M en-small-slim.pt en-small-slim.pt.part- && rm en-small-slim.pt)
cp "$run/train_log.jsonl" "$run/en-small_run.yaml" "$out/"
ls -la "$out"
exit "$status"
