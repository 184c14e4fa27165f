# One-command set-up: `make serve` runs the server, `make test` the suite; both install first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# torch is pinned here, not locked: the CPU wheel this machine kind ships (pip finds it); PyPI's build of the
# same version pulls several GB of CUDA packages
TORCH := torch==2.13.0
TORCH_WHEELS ?= /opt/wheels
UV := uv==0.13.9

.PHONY: install serve test bench cuda-check lock lock-upgrade clean

install: $(STAMP)

# every package at its locked version, each file checked against the lock's hashes; then torch and the project
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps $(TORCH)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# gRPC on 50051, HTTP (µLM's REST API and OpenAI-compatible completions) on HTTP_PORT
HTTP_PORT ?= 8000

serve: install
	$(PY) -m server --http-port $(HTTP_PORT) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m bench.decode --presets toy,gpt2-small
	$(PY) -m bench.serving --preset gpt2-small
	$(PY) -m bench.train

# On a machine with an NVIDIA GPU: every CUDA path's tests (the torch backend and the server on cuda, ONNX Runtime's
# CUDA provider, bf16 and nccl training), then GPT-2-small's decode and serving benchmarks on cuda, in about five
# minutes. CUDA_PY: a Python whose torch is a CUDA build, with this project installed (the venv's is the CPU wheel).
CUDA_PY ?= $(PY)
CUDA_OUT := build/bench/cuda

cuda-check:
	$(CUDA_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'cuda-check: this torch sees no CUDA device (set CUDA_PY)')"
	$(CUDA_PY) -m pytest -q -rs tests/test_cuda.py
	$(CUDA_PY) -m bench.decode --presets gpt2-small --backends torch,onnx-fp32 --device cuda --repeats 2 --out $(CUDA_OUT)/decode.json
	$(CUDA_PY) -m bench.serving --preset gpt2-small --backends torch,onnx-fp32 --device cuda --concurrency 1,16 --rounds 1 --out $(CUDA_OUT)/serving.json

# lock: resolve pyproject.toml's dependencies (against torch's CPU wheel) into requirements.lock with hashes,
# keeping the versions already locked; lock-upgrade: the newest versions it allows. Then `make test`, commit.
lock lock-upgrade:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(UV)
	printf 'setuptools>=68\nwheel\n$(TORCH)+cpu\n' | $(VENV)/bin/uv pip compile pyproject.toml - --extra test \
	  $(if $(filter lock-upgrade,$@),--upgrade) --generate-hashes --python-version 3.11 --find-links $(TORCH_WHEELS) \
	  --no-emit-package torch --custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf $(VENV)
