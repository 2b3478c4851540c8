# Set-up is two commands on a fresh machine: `make train` and `make test`.
# Both create .venv when it is missing. torch and torchvision are pinned through
# constraints.txt so pip never swaps the CPU torch wheel for a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NUM_RANKS ?= 2
CONFIG ?= ds_configs/quickstart.json
# extra launcher flags, e.g. TRAIN_ARGS=--fresh for a second `make train` (runs/quickstart/ then holds a run)
TRAIN_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export PYTHONWARNINGS ?= ignore::DeprecationWarning,ignore::FutureWarning
# pip installs with --no-compile (26 s instead of 58 s on the 2-core machine); Python then
# compiles a module on its first import and must be allowed to cache it, even where the
# environment sets PYTHONDONTWRITEBYTECODE (the dev machine does): otherwise every process
# compiles torch and DeepSpeed again (~8 s per rank start, ~100 process starts in make test)
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install test train bench study study-pretrained clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt torch==2.13.0 -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

train: $(STAMP)
	@echo "+ $(BIN)/deepspeed --num_gpus $(NUM_RANKS) launch/train.py --deepspeed_config $(CONFIG) $(TRAIN_ARGS)"
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed --num_gpus $(NUM_RANKS) launch/train.py --deepspeed_config $(CONFIG) $(TRAIN_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/overhead.py --optimizer sgd --out docs/benchmarks.md
	$(BIN)/python bench/overhead.py --optimizer adamw --out docs/benchmarks.md
	$(BIN)/python bench/plot_overhead.py

# issue 14's large-batch study: ~1.5 h on the 2-core machine; finished cells are reused
study: $(STAMP)
	$(BIN)/python launch/study.py

# issue 33's study under the paper's conditions (docs/large_batch_pretrained.md): tau/alpha on the
# held-out draw, then the grid; ~2.9 h on the 2-core machine (--dry-run prints the estimate);
# needs models/pretrained/uninet_tiny_shapes.safetensors (bench/pretrain_backbone.py)
study-pretrained: $(STAMP)
	$(BIN)/python launch/study.py --grid pretrained --select
	$(BIN)/python launch/study.py --grid pretrained

clean:
	rm -rf $(VENV) .cache runs
