# mailbag: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench bench-auth clean cluster

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $@

## run: a demo server on 127.0.0.1:1110 (user demo, password demo); try `telnet 127.0.0.1 1110`
run: $(VENV)/.installed
	$(VENV)/bin/mailbag demo

## test: the static checks (ruff, mypy --strict, the import-layering contract) and the whole test suite
test: lint
	$(PY) -m pytest

## lint: ruff, mypy --strict and lint-imports (the layers of DESIGN.md, see pyproject.toml)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

## bench: mailbag (1 and 2 workers) vs a private Dovecot (4 variants), side by side (installs
## Dovecot if missing; run as root; ~25 min, BENCH_ARGS=--quick for ~10); writes
## docs/benchmarks.md and docs/benchmarks/*.png
bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

## bench-auth: login-STAT-QUIT at concurrency 50, Argon2id vs {PLAIN} users, and the auth cache's
## hit rate (~30 s, no root needed; BENCH_ARGS="--cache-ttl 0" measures without the cache)
bench-auth: $(VENV)/.installed
	$(PY) bench/auth_cache.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

## cluster: PostgreSQL (private if none on 5432) + `mailbag db init` + 3 nodes + HAProxy on one
## machine, demo users demo/demo and alice/alice; POP3 127.0.0.1:2110; Ctrl-C stops all of it
cluster: $(VENV)/.installed
	$(PY) scripts/cluster.py
