# NeuronDeck. `make run` sets up and starts everything; `make test` runs the suite (PostgreSQL, then SQLite).
PY ?= python3.11
VENV := .venv
BIND ?= 127.0.0.1:8000
# The endpoints gateway (every inference endpoint's stable URL) listens here.
GATEWAY_HOST ?= 127.0.0.1
GATEWAY_PORT ?= 8001
ENDPOINT_GATEWAY_URL ?= http://$(GATEWAY_HOST):$(GATEWAY_PORT)
NEURONDECK_HOST ?= $(shell hostname)
NEURONDECK_CPU_SLOTS ?= 4
export BIND NEURONDECK_HOST NEURONDECK_CPU_SLOTS GATEWAY_HOST GATEWAY_PORT ENDPOINT_GATEWAY_URL

.PHONY: install run test bench migrate

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .  # the neurondeck command
	touch $@

install: $(VENV)/.installed

migrate: install
	$(VENV)/bin/python manage.py migrate --noinput

# `make run` serves plain HTTP with DEBUG off, so nobody who can reach it sees Django's
# debug pages (every URL pattern on a 404, settings on an error): the secret key is made
# once per install in var/secret_key, and the HTTPS-only defaults of DEBUG off are off.
# Any of these set in the environment wins (DEBUG=1 make run for development).
RUN_ENV = DEBUG=$${DEBUG:-0} SECRET_KEY="$${SECRET_KEY:-$$(cat var/secret_key)}" \
	SECURE_SSL_REDIRECT=$${SECURE_SSL_REDIRECT:-0} SECURE_COOKIES=$${SECURE_COOKIES:-0} \
	SECURE_HSTS_SECONDS=$${SECURE_HSTS_SECONDS:-0} TRUST_X_FORWARDED_PROTO=$${TRUST_X_FORWARDED_PROTO:-0}

var/secret_key:
	mkdir -p var
	umask 077 && $(PY) -c "import secrets; print(secrets.token_urlsafe(50))" > $@

run: migrate var/secret_key
	$(VENV)/bin/python manage.py seed_demo
	$(VENV)/bin/python manage.py ensure_redis
	@echo ""
	@echo "NeuronDeck is starting at http://$(BIND)/  (host $(NEURONDECK_HOST), $(NEURONDECK_CPU_SLOTS) CPU job slots)"
	@echo "Log in as admin, alice or bob with password 'neurondeck'. Ctrl-C stops everything."
	@echo "Inference endpoints' stable URLs: $(ENDPOINT_GATEWAY_URL)/endpoints/<team>/<endpoint>/v1/..."
	@echo ""
	$(RUN_ENV) $(VENV)/bin/honcho -f webapp/Procfile -d . start

# `make test` runs everything on PostgreSQL, then what a user does (API, pages, tokens
# and roles, submit, a worker's run, usage and live metrics, end to end, hostile input
# with fewer generated examples) again on SQLite, `make run`'s default database. Tests marked postgres_only (row-lock races,
# faults, PostgreSQL-only caches) are skipped there.
SQLITE_TEST_DB ?= $(CURDIR)/var/test-sqlite/neurondeck.sqlite3
SQLITE_TESTS := tests/test_e2e_jobs.py tests/test_browser_jobs.py tests/test_api_jobs.py tests/test_api_scoping.py \
	tests/test_pages.py tests/test_roles.py tests/test_submit.py tests/test_worker_run.py tests/test_usage.py \
	tests/test_metrics.py tests/test_hostile_fixes.py tests/test_hostile_input.py

test: install
	$(VENV)/bin/lint-imports --cache-dir $(VENV)/.import_linter_cache
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	DATABASE_URL=sqlite:///$(SQLITE_TEST_DB) HOSTILE_EXAMPLES=15 $(VENV)/bin/python -m pytest -m "not postgres_only" $(SQLITE_TESTS) $(PYTEST_ARGS)

bench: install
	for b in bench/*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done
