# All set-up happens here: `make test` and `make demo` create .venv when it is missing and
# install everything through constraints.txt (torch pinned to the local CPU wheel).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-vision pytest lint typecheck demo demo-distributed bench bench-experts blocks-evidence accuracy faults docs-tables clean dist gpu-check test-compat test-newest

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,lab]"
	touch $(STAMP)

## test: lint, type-check and run the test suite (what CI runs)
test: lint typecheck pytest

## test-vision: the timm / torchvision models of the real-models matrix, in their own venv
## (torch 2.14.1 + torchvision 0.29.1, about 5.5 GB: no torchvision imports beside the main
## venv's CPU torch 2.13.0). CI runs it after `make test`.
VISION := .venv-vision
VISION_STAMP := $(VISION)/.installed
$(VISION_STAMP): pyproject.toml constraints-vision.txt
	test -x $(VISION)/bin/python || $(PYTHON) -m venv $(VISION)
	$(VISION)/bin/python -m pip install --quiet --upgrade pip
	$(VISION)/bin/python -m pip install --quiet -c constraints-vision.txt torch torchvision timm pytest
	$(VISION)/bin/python -m pip install --quiet -c constraints-vision.txt --no-deps -e .
	touch $(VISION_STAMP)

test-vision: $(VISION_STAMP)
	$(VISION)/bin/python -m pytest -q tests/vision

## test-compat: the test suite on every supported pair, each in its own venv under .venv-compat/
## (scripts/compat.sh): Python 3.11, 3.12 and 3.13 with torch 2.14.1, and Python 3.11 with the
## oldest torch pyproject.toml admits. About 10 minutes a pair on 2 cores, installs included.
OLDEST_TORCH := 2.9.1
COMPAT := 3.11:2.14.1 3.12:2.14.1 3.13:2.14.1 3.11:$(OLDEST_TORCH)
test-compat:
	@for pair in $(COMPAT); do bash scripts/compat.sh $${pair%%:*} $${pair##*:} || exit 1; done

## test-newest: the newest supported pair only (Python 3.13, torch 2.14.1); CI runs it
test-newest:
	bash scripts/compat.sh 3.13 2.14.1

pytest: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

## demo: AdamW vs Muon vs unconstrained Scion on gpt-tiny and Python's own sources (a few minutes)
demo: $(STAMP)
	$(VENV)/bin/gluon-optim demo

## demo-distributed: 2 gloo processes under torchrun, DDP (distributed="replicated") and FSDP2
## (distributed="sharded"), against one process: the same batch on both ranks gives the same
## losses and weights bit for bit; split batches agree to rounding (about a minute)
DDP_RUN := --model gpt-tiny --optimizer muon --steps 100 --threads 1 --eval-every 50 --quiet
DEMO_DDP := runs/demo-distributed
demo-distributed: $(STAMP)
	rm -rf $(DEMO_DDP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m gluon_optim.lab train --parallel ddp \
		--batch-split none --batch-size 8 $(DDP_RUN) --out $(DEMO_DDP)/ddp-same-batch
	$(VENV)/bin/gluon-optim train --batch-size 8 $(DDP_RUN) --out $(DEMO_DDP)/one-process-b8
	$(VENV)/bin/gluon-optim diff $(DEMO_DDP)/ddp-same-batch $(DEMO_DDP)/one-process-b8
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m gluon_optim.lab train --parallel fsdp2 \
		--batch-split none --batch-size 8 $(DDP_RUN) --out $(DEMO_DDP)/fsdp2-same-batch
	$(VENV)/bin/gluon-optim diff $(DEMO_DDP)/fsdp2-same-batch $(DEMO_DDP)/one-process-b8
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m gluon_optim.lab train --parallel ddp \
		--batch-split rank --batch-size 8 $(DDP_RUN) --out $(DEMO_DDP)/ddp-split
	$(VENV)/bin/gluon-optim train --batch-size 16 $(DDP_RUN) --out $(DEMO_DDP)/one-process-b16
	$(VENV)/bin/gluon-optim diff $(DEMO_DDP)/ddp-split $(DEMO_DDP)/one-process-b16 --tolerance 0.05
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m gluon_optim.lab train --parallel fsdp2 \
		--batch-split rank --batch-size 8 $(DDP_RUN) --out $(DEMO_DDP)/fsdp2-split
	$(VENV)/bin/gluon-optim diff $(DEMO_DDP)/fsdp2-split $(DEMO_DDP)/one-process-b16 --tolerance 0.05

## bench: step time against the peers, polar-factor scaling, tokens/s (about 20 minutes on 2 cores)
bench: $(STAMP)
	$(VENV)/bin/gluon-optim bench --widths 256,384,768 --train --train-model gpt-small \
		--train-batch-size 8 --train-steps 6 --train-warmup 2 --out runs/bench

## bench-experts: one 64-expert layer's Muon step, batched experts against a loop, torch.optim.Muon
## and one standalone Newton–Schulz per expert (JSON in runs/bench-experts.json)
bench-experts: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/experts.py --json runs/bench-experts.json

## blocks-evidence: whole against split fused qkv (gpt-tiny) and gate / up (moe-tiny), lr sweeps and
## 3 seeds for muon and unscion (about 25 minutes on 2 cores; JSON in runs/blocks-evidence.json)
blocks-evidence: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/blocks_evidence.py --json runs/blocks-evidence.json

## accuracy: Newton–Schulz error per preset and parity errors against the peers
accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

## faults: kills and damaged run folders against resume, and mutated state dicts (a few minutes;
## prints "N faults, S survived, R refused, X silent, P partial, T tracebacks", fails on X, P or T)
faults: $(STAMP)
	$(PY) benchmarks/faults.py

## docs-tables: regenerate the settings, estimator and radius-policy tables of docs/optimizer.md
docs-tables: $(STAMP)
	$(PY) -c "from gluon_optim.groups import write_docs; write_docs('docs/optimizer.md')"

## dist: build the sdist and the wheel (from the sdist) into dist/ and `twine check` them;
## tests/test_wheel.py installs such a wheel in a clean venv and runs the README's quick start
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

## gpu-check: on a CUDA machine, the CUDA tests, a bf16 Newton–Schulz step benchmark against
## torch.optim.Muon (JSON in runs/gpu-check/), the lab where it runs on CUDA; no CUDA: one line
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(VISION) .venv-compat build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
