# ernie-patcher — `make demo` shows the tool on a throwaway environment, `make test` runs every tier.
SHELL := /bin/bash
PYTHON ?= python3.11
CACHE ?= $(HOME)/.cache/ernie-patcher
export ERNIE_PATCHER_CACHE := $(CACHE)

VENV := .venv
# The sequence-parallel tier runs on each vllm-omni release named by tests/sp/requirements/vllm-omni-X.txt
# (the release, its vllm and its diffusers); `make test` runs the oldest and the newest, and
# `make test-sp-matrix` every one.
SP_REQS := $(wildcard tests/sp/requirements/vllm-omni-*.txt)
SP_RELEASES := $(shell printf '%s\n' $(SP_REQS:tests/sp/requirements/vllm-omni-%.txt=%) | sort -V)
SP_EDGES := $(firstword $(SP_RELEASES)) $(lastword $(SP_RELEASES))
PYTEST_FLAGS ?= -q -p no:cacheprovider
# pytest exits 5 when it collects no tests: that is a failure here, said out loud.
pytest = $(1) -m pytest $(PYTEST_FLAGS) $(2) || { rc=$$?; [ $$rc -ne 5 ] || echo "error: no tests collected in $(2)" >&2; exit $$rc; }

.PHONY: demo test lint-imports test-core test-numerics test-sp test-sp-matrix test-container bench matrix canary mutate clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Heavy tiers live in cached environments named by the hash of their requirement files and built
# once (tests/tier_env.sh): no file-time prerequisite, so a fresh clone reuses what is cached.
tier_env = $$(PYTHON=$(PYTHON) bash tests/tier_env.sh $(1))
# MindIE-SD's own Python (mindiesd 3.1.0, --no-deps) on PYTHONPATH over the numerics and SP environments.
MINDIESD := overlay tests/requirements-mindiesd.txt

demo: $(VENV)/.ready
	$(VENV)/bin/python bench/demo.py

test: lint-imports test-core test-numerics test-sp test-container

# The layer contracts of pyproject.toml (import-linter): no module imports from a folder above its own.
lint-imports: $(VENV)/.ready
	$(VENV)/bin/lint-imports --no-cache --no-logo

test-core: $(VENV)/.ready
	$(call pytest,$(VENV)/bin/python,tests/engine $(wildcard tests/faults) $(wildcard tests/authoring))

test-numerics:
	venv=$(call tier_env,torch tests/requirements-torch.txt) && overlay=$(call tier_env,$(MINDIESD)) && \
	$(call pytest,PYTHONPATH=$(CURDIR):$$overlay $$venv/bin/python,tests/numerics)

test-sp: $(addprefix test-sp-,$(sort $(SP_EDGES)))

test-sp-matrix: $(addprefix test-sp-,$(SP_RELEASES))

# One release's SP tier: its cached environment (built on first use; environments no current
# requirement file names are removed), then the tier's tests on that release.
test-sp-%:
	@test -f tests/sp/requirements/vllm-omni-$*.txt || { echo "error: no tests/sp/requirements/vllm-omni-$*.txt" >&2; exit 2; }
	venv=$(call tier_env,sp tests/sp/requirements/vllm-omni-$*.txt $(SP_REQS)) && overlay=$(call tier_env,$(MINDIESD)) && \
	$(call pytest,ERNIE_PATCHER_TIER=sp PYTHONPATH=$(CURDIR):$$overlay $$venv/bin/python,tests/sp)

# The example image serves (tests/engine/test_container_layout.py): examples/Dockerfile's install step
# over the cached SP environment of the vllm-omni release it installs (whose vllm and what vllm
# requires stand in for the vllm-ascend base image), then pip check and a serving process's imports.
IMAGE_BASE_REQ := tests/sp/requirements/vllm-omni-$(shell sed -n "s/^ARG VLLM_OMNI=//p" examples/Dockerfile).txt
test-container: $(VENV)/.ready
	base=$(call tier_env,sp $(IMAGE_BASE_REQ) $(SP_REQS)) && \
	$(call pytest,ERNIE_PATCHER_IMAGE_BASE=$$base $(VENV)/bin/python,tests/engine/test_container_layout.py)

# Start-up ratios (small and ~220-distribution environments), then large diffs against GNU patch.
bench: $(VENV)/.ready
	$(VENV)/bin/python bench/startup.py
	$(VENV)/bin/python bench/largediff.py
	$(VENV)/bin/python bench/gitdiff.py

matrix: $(VENV)/.ready
	$(VENV)/bin/python bench/version_matrix.py

# Not part of `make test` (it needs the package index): the newest release of each package, and any
# given as VERSIONS="vllm-omni==0.28.0 diffusers==0.39.0", planned with apply --dry-run; writes
# bench/RELEASES.md and exits 1 when a release has a patch that does not fit.
canary: $(VENV)/.ready
	$(VENV)/bin/python bench/canary.py $(VERSIONS)

# Not part of `make test`: breaks the engine one mutation at a time, lists any the core tests miss.
mutate: $(VENV)/.ready
	$(VENV)/bin/python bench/mutate.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
