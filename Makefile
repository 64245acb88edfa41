# ernie-patcher — `make demo` shows the tool on a throwaway environment, `make test` runs every tier.
SHELL := /bin/bash
PYTHON ?= python3.11
CACHE ?= $(HOME)/.cache/ernie-patcher
export ERNIE_PATCHER_CACHE := $(CACHE)

VENV := .venv
TORCH_VENV := $(CACHE)/venv-torch-$(shell cat tests/requirements-torch.txt | sha256sum | cut -c1-12)
SP_VENV := $(CACHE)/venv-sp-$(shell cat tests/requirements-sp.txt | sha256sum | cut -c1-12)
PYTEST_FLAGS ?= -q -p no:cacheprovider
# pytest exits 5 when it collects no tests: that is a failure here, said out loud.
pytest = $(1) -m pytest $(PYTEST_FLAGS) $(2) || { rc=$$?; [ $$rc -ne 5 ] || echo "error: no tests collected in $(2)" >&2; exit $$rc; }

.PHONY: demo test test-core test-numerics test-sp bench matrix mutate clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Heavy tiers live in cached environments named by the hash of their requirement files and built
# once: no file-time prerequisite, so a fresh clone (new mtimes) reuses what is cached.
$(TORCH_VENV)/.ready:
	rm -rf $(TORCH_VENV) $(TORCH_VENV).tmp
	$(PYTHON) -m venv $(TORCH_VENV).tmp
	$(TORCH_VENV).tmp/bin/pip install -q --disable-pip-version-check -r tests/requirements-torch.txt
	mv $(TORCH_VENV).tmp $(TORCH_VENV) && touch $@

$(SP_VENV)/.ready:
	rm -rf $(SP_VENV) $(SP_VENV).tmp
	$(PYTHON) -m venv $(SP_VENV).tmp
	$(SP_VENV).tmp/bin/pip install -q --disable-pip-version-check -r tests/requirements-sp.txt
	mv $(SP_VENV).tmp $(SP_VENV) && touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/python bench/demo.py

test: test-core test-numerics test-sp

test-core: $(VENV)/.ready
	$(call pytest,$(VENV)/bin/python,tests/engine $(wildcard tests/faults) $(wildcard tests/authoring))

test-numerics: $(TORCH_VENV)/.ready
	$(call pytest,PYTHONPATH=$(CURDIR) $(TORCH_VENV)/bin/python,tests/numerics)

test-sp: $(SP_VENV)/.ready
	$(call pytest,ERNIE_PATCHER_TIER=sp PYTHONPATH=$(CURDIR) $(SP_VENV)/bin/python,tests/sp)

bench: $(VENV)/.ready
	$(VENV)/bin/python bench/startup.py

matrix: $(VENV)/.ready
	$(VENV)/bin/python bench/version_matrix.py

# Not part of `make test`: breaks the engine one mutation at a time, lists any the core tests miss.
mutate: $(VENV)/.ready
	$(VENV)/bin/python bench/mutate.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
