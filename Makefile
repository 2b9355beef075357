# The README's two commands: `make demo` and `make test`. Both set up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT := outputs/compare.png

.PHONY: setup demo test test-all test-wheel test-oldest lint app gpu-wheels

setup: $(STAMP)

# Re-running is a no-op until pyproject.toml or constraints.txt changes. The constraints hold the
# exact versions the project is tested on (the CPU torch wheel on local disk here).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The main job: CFG, APG, AG and LinearAG on the same seeds, with NFE, time, judge accuracy, distance
# to the CFG images, and the frontier benchmark's precision/recall of each setting.
demo: setup
	$(BIN)/diffguide compare --methods cfg,apg,ag,linear-ag --scale 3 --steps 20 --labels 0-9 --n 2 --seed 0 --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

# The built wheel into a fresh venv holding torch and diffusers: changes neither, runs offline.
test-wheel: setup
	.ci/wheel

# The adapter tests on the oldest supported diffusers (.venv-oldest).
test-oldest:
	.ci/oldest

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The browser demo on http://127.0.0.1:7860 (the dev extra includes Gradio).
app: setup
	$(BIN)/diffguide app

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Wheels for evals/gpu_walltime.sh on a GPU machine that reaches no registry (CPython 3.12, x86-64):
# diffusers and xformers (and diffusers' one dependency such images lack), into the git-ignored .whl/.
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		$$(grep -m1 '^diffusers==' constraints.txt) $$(grep -m1 '^xformers==' constraints.txt) importlib_metadata
