# Quick start: `make demo` then `make test`. Each works as the first command on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on this kind of machine; on a GPU box use e.g. `make setup TORCH_SPEC=torch` for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow docs clean gpu-check gpu-check-cpu

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Trains the builtin tiny model, then asks it one question (`longtune chat`, greedy); for a conversation run
# `longtune chat runs/demo_sft`, for eval-set predictions `longtune predict examples/predict_demo.yaml`.
demo: setup
	$(VENV)/bin/longtune train examples/demo_sft.yaml overwrite_output_dir=true
	@echo "User: Which day comes after Saturday?"
	$(VENV)/bin/longtune chat runs/demo_sft do_sample=false max_new_tokens=16 --message "Which day comes after Saturday?"

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

docs: setup
	$(PY) scripts/gen_config_docs.py

clean:
	rm -rf $(VENV) runs

# The CUDA paths on a GPU machine (1-8 GPUs, under 9 minutes): `make setup TORCH_SPEC=torch && make gpu-check`.
gpu-check: setup
	$(PY) scripts/gpu_check.py

# Its CPU-runnable parts (gloo, tiny sizes); tests/test_gpu_check.py runs the quick form of this in CI.
gpu-check-cpu: setup
	$(PY) scripts/gpu_check.py --cpu
