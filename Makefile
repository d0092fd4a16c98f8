# Two entry points: `make demo` and `make test`. Each creates .venv and installs pinned versions itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export WANDB_SILENT := true
export PYTHONHASHSEED := 0

.PHONY: demo test venv bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools==84.2.1
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/clipline demo --out demo_out

# Two test processes (pytest-xdist): a file's tests stay on one worker, the synthetic build's files share one.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python benchmarks/curate_bench.py

clean:
	rm -rf demo_out .pytest_cache

# Side environment .venv-openclip (torch 2.14.1 + torchvision 0.29.1 from local wheels, open_clip_torch 3.3.0,
# webdataset 0.2.86, clip-benchmark), then clip_train vs open_clip feature/tokenizer parity both ways.
parity:
	$(PY) benchmarks/parity_openclip.py
