# Each target sets itself up: a .venv in the repo, the pinned CPU torch, then orch and its deps.
# A GPU user installs their own torch first; TORCH_SPEC= (empty) skips the pin.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.orch-installed
AIO_STAMP := $(VENV)/.orch-async-io

.PHONY: demo test bench lint setup clean

setup: $(STAMP) $(AIO_STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	# deepspeed ships as source and imports torch to build: build it against the torch above
	# (build isolation would fetch an unpinned, multi-GB CUDA torch); DS_BUILD_OPS=0 defers ops.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# Offload's DeepSpeed ops, built once (about 8 minutes on 2 cores) into .venv/torch_extensions:
# the async I/O op of the NVMe tier (needs libaio's headers) and CPU Adam. Without them the
# tier uses its O_DIRECT fallback, the CPU step torch's fused AdamW, and the tests marked nvme
# skip, saying why.
$(AIO_STAMP): $(STAMP)
	@if [ ! -f /usr/include/libaio.h ] && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq libaio-dev >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq libaio-dev >/dev/null) || true; fi
	@echo "building DeepSpeed's async I/O and CPU Adam ops (once; a few minutes)"
	@$(PY) -c "from orch.offload.blockio import load_async_io; load_async_io()" 2>&1 \
		| grep -v "Setting accelerator to CPU" || true
	@$(PY) -c "from orch.offload.cpu_adam import load_cpu_adam; load_cpu_adam()" 2>&1 \
		| grep -v "Setting accelerator to CPU" || true
	@touch $(AIO_STAMP)

# The main job: plan, then train the tiny Llama on 2 CPU processes (FSDP) on the shipped corpus,
# evaluated every 100 steps on held-out text (this repository's README). It stops half way as if
# preempted, then the same command resumes from the checkpoint.
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
DEMO_EVAL := --set eval.interval=100 --set eval.batches=4 --set eval.path=README.md
demo: $(STAMP) $(AIO_STAMP)
	$(VENV)/bin/orch plan configs/tiny.yaml --world-size 2 --device cpu
	$(VENV)/bin/orch launch --nproc-per-node 2 configs/tiny.yaml --set run.dir=$(DEMO_DIR) \
		$(DEMO_EVAL) --set run.stop_at_step=250
	@echo "== stopped at step 250 as if preempted; the same command resumes from its checkpoint =="
	$(VENV)/bin/orch launch --nproc-per-node 2 configs/tiny.yaml --set run.dir=$(DEMO_DIR) \
		$(DEMO_EVAL)

# Two pytest workers (pytest-xdist), each taking a test file at a time so that a module's
# fixtures and processes stay together: one pytest alone leaves a core idle much of the time.
TEST_WORKERS ?= 2

test: $(STAMP) $(AIO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

BENCH_STAMP := $(VENV)/.orch-bench

# The outside implementations the benchmarks compare with (pyproject's bench extra).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(AIO_STAMP) $(BENCH_STAMP)  # the CPU benchmarks (about an hour on 2 cores); GPU ones: see README
	$(PY) benchmarks/plan_search.py
	$(PY) benchmarks/optim8bit.py --device cpu --steps 30
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/parallel_cpu.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/hetero_nic.py
	$(PY) benchmarks/offload_io.py
	$(PY) benchmarks/offload_cpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
