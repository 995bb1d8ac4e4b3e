# streamq: everything a person can do, in one place. `make help` lists it.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The CPU wheel, used only when the venv has no torch yet; a CUDA torch already
# installed (e.g. VENV pointing at your own environment) is left alone.
TORCH   ?= torch==2.13.0
CONFIG  ?= configs/examples/tiny_qwen3_moe_fp8_static.yaml
ARGS    ?=
DEMO    := build/demo

.PHONY: help install demo quantize plan test test-fast lint bench bench-dist bench-host-depth bench-gptq-units bench-link profile-layer eval-table clean

help:
	@echo "make install                   create $(VENV) and install streamq (+ test tools)"
	@echo "make demo                      build a tiny MoE model offline, quantize it (fp8_dynamic + fp8_static)"
	@echo "make quantize CONFIG=... [ARGS='--model-path P --data-path P --save-path P --device cuda --overwrite']"
	@echo "make test                      install and run the test suite"
	@echo "make lint                      ruff"
	@echo "make bench                     benchmark against the I/O and compute floor (bench_out/)"
	@echo "make bench-dist                1 vs 2 processes (torchrun) on 2 GPUs, byte-identical outputs (scripts/bench_dist.sh;"
	@echo "                               ALGOS=\"fp8_static int4_gptq\" SAMPLES=... SEQ=... LAYERS=... as its header says)"
	@echo "make bench-host-depth          CPU host memory at 4 vs 48 layers, plan next to measurement (scripts/bench_host_depth.sh)"
	@echo "make bench-gptq-units          one GPTQ solve of each work unit of a 235B layer on a GPU, next to its modelled"
	@echo "                               cost, which splits the work across processes (scripts/time_gptq_units.py)"
	@echo "make bench-link                NCCL broadcast bandwidth between 2 GPUs for the sizes a torchrun job sends"
	@echo "                               (a batch's hidden states, a layer), context for bench-dist (scripts/bench_link.py)"
	@echo "make profile-layer CONFIG=...  torch.profiler around one layer of a run, its stages marked (scripts/profile_layer.py;"
	@echo "                               LAYER=3 NPROC=2 ARGS=--trace QARGS=--overwrite; prints per process, writes build/profile/)"
	@echo "make eval-table                quality table: bf16 vs each scheme on the trained fixtures (ARGS='--schemes ...')"
	@echo "                               llm-compressor side by side: scripts/peer_llmcompressor.py (its own venv), then --peer"
	@echo "                               (build/eval_table/; ARGS='--device cuda --models DIR ...')"
	@echo "make clean                     remove build outputs"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

$(DEMO)/tiny-qwen3-moe/config.json: | install
	$(PY) scripts/make_tiny_models.py --arch qwen3_moe --layers 4 --out $(DEMO)/tiny-qwen3-moe

demo: install $(DEMO)/tiny-qwen3-moe/config.json
	$(PY) -m streamq quantize -c configs/examples/tiny_qwen3_moe_fp8_dynamic.yaml --overwrite $(ARGS)
	$(PY) -m streamq quantize -c configs/examples/tiny_qwen3_moe_fp8_static.yaml --overwrite $(ARGS)
	@echo "demo outputs: $(DEMO)/out-fp8-dynamic $(DEMO)/out-fp8-static"

quantize: install
ifeq ($(NPROC),)
	$(PY) -m streamq quantize -c $(CONFIG) $(ARGS)
else
	$(PY) -m torch.distributed.run --nproc-per-node $(NPROC) -m streamq quantize -c $(CONFIG) $(ARGS)
endif

test: install
	$(PY) -m pytest -q tests $(ARGS)

lint: install
	$(PY) -m ruff check streamq scripts tests

bench: install
	$(PY) scripts/bench.py $(ARGS)

bench-dist: install
	PATH=$(VENV)/bin:$$PATH bash scripts/bench_dist.sh

bench-host-depth: install
	PY=$(PY) bash scripts/bench_host_depth.sh

bench-gptq-units: install
	PYTHONPATH=. $(PY) scripts/time_gptq_units.py

bench-link: install
	$(PY) -m torch.distributed.run --nproc-per-node 2 scripts/bench_link.py

LAYER ?= 3
profile-layer: install
	$(if $(filter-out 1,$(or $(NPROC),1)),$(PY) -m torch.distributed.run --nproc-per-node $(NPROC),$(PY)) \
	  scripts/profile_layer.py --layer $(LAYER) --out build/profile $(ARGS) -- quantize -c $(CONFIG) -q $(QARGS)

eval-table: install
	$(PY) scripts/eval_table.py $(ARGS)

clean:
	rm -rf build bench_out .pytest_cache
