# The two commands: `make test` and `make bench`. Each makes .venv with the pinned versions
# when it is missing, builds the extension when a source changed, then does its job.
PYTHON ?= python3.11
GPU_PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT := $(VENV)/.mmkernels-built
SOURCES := setup.py csrc/sources.txt $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
export MAX_JOBS ?= 2

.PHONY: test bench build pytest ctest compile-gpu gpu-check clean

test: pytest ctest compile-gpu

bench: $(EXT)
	$(PY) -m mmkernels.cli bench

build: $(EXT)

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(EXT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

pytest: $(EXT)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

# The same C++ sources as a library against libtorch, with a C++ test run by ctest.
ctest: $(DEPS)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

# Every Triton kernel compiled for sm_80 and sm_90 without a GPU: shared memory, registers,
# spills against budgets (mmkernels/backends/triton/budgets.py). FULL=1 for the whole sweep.
compile-gpu: $(DEPS)
	$(PY) tools/compile_gpu.py $(if $(FULL),--full --cuda,)

# On a GPU machine with no network: build, tests, sanitizers and the benchmark, one results
# folder (tools/gpu_check.py). Uses the python there (GPU_PYTHON, default python3), not .venv.
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(ARGS)

clean:
	rm -rf build mmkernels/_C*.so $(EXT)
