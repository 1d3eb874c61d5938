# Two set-up commands: `make demo` and `make test`. Everything else is optional.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
PYTEST := python -m pytest -q --nbmake -p no:cacheprovider
# `make lock` resolves with uv for this machine's Python and platform; torch is the CPU build on
# local disk (requirements/overrides.txt), which pip finds through its find-links.
UV := uv==0.13.9
LOCK_FLAGS := --extra dev --override requirements/overrides.txt --find-links /opt/wheels \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: install demo docs test test-latest lock bench bench-schedules lab toy-vlm eval-toy-vlm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Every version from the lock (what the suite passed with); attnflow itself editable, no re-resolve.
$(STAMP): $(BIN)/python $(LOCK) pyproject.toml
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the lock to the newest versions pyproject's ranges allow (then run `make test`).
lock:
	$(PY) -m venv .venv-tools
	.venv-tools/bin/pip install -q $(UV)
	.venv-tools/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --upgrade --no-header -o $(LOCK)

# names normalised (PEP 503): pip freeze and uv spell some differently
define DRIFT
import re, sys
key = lambda line: re.sub(r"[-_.]+", "-", line.strip().lower())
lock = {key(l) for l in open(sys.argv[1]) if "==" in l}
new = [l.strip() for l in open(sys.argv[2]) if "==" in l and key(l) not in lock]
print("not in the lock:", ", ".join(new) or "nothing")
endef
export DRIFT

# Drift check: a fresh venv with the newest versions the ranges allow, then the whole suite.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	@.venv-latest/bin/python -c "$$DRIFT" $(LOCK) .venv-latest/versions.txt
	.venv-latest/bin/$(PYTEST)

# The default model's first 300 held-out prompts (derive on 198, 99 of them validating: enough for 95% agreement;
# verify on 102), 3 timing rounds: <= 150 s.
DEMO := --limit 300 --holdout 0.34 --repeats 3

demo: $(STAMP)
	$(BIN)/attnflow run --out runs/demo --force $(DEMO)

# The README's demo and models sections, docs/demo/ and docs/models/ come from these real runs (tests
# check they agree).
BUNDLED := toy-vlm toy-llava-scenes toy-idefics3-scenes
docs: $(STAMP)
	$(BIN)/attnflow run --out runs/docs --force $(DEMO)
	$(BIN)/python -m attnflow.reports.readme runs/docs
	$(BIN)/attnflow models --json > runs/models.json
	for m in $(BUNDLED); do $(BIN)/attnflow run --model $$m --out runs/docs-$$m --force || exit 1; done
	$(BIN)/python -m attnflow.reports.readme --models runs/models.json $(addprefix runs/docs-,$(BUNDLED))

test: $(STAMP)
	$(BIN)/$(PYTEST)

bench: $(STAMP)
	$(BIN)/python -m attnflow.benchmarks.run

# Schedules derived on calibration prompts, verified on each trained model's held-out set (#14's targets).
bench-schedules: $(STAMP)
	$(BIN)/python -m attnflow.benchmarks.schedules

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

toy-vlm: $(STAMP)
	$(BIN)/python -m attnflow.toys.train_toy_vlm --out data/toy-vlm

eval-toy-vlm: $(STAMP)
	$(BIN)/attnflow eval --model toy-vlm

# The scene VLMs (toys/scene_task.py), trained on the CPU (1 thread, seed 0; about 45 and 30 minutes
# here, one per core, in the background), and their shared held-out set.
.PHONY: toy-scenes toy-llava-scenes toy-idefics3-scenes eval-toy-llava-scenes eval-toy-idefics3-scenes

toy-scenes: $(STAMP)
	$(BIN)/python -m attnflow.toys.scene_task --out data/toy-scenes

toy-llava-scenes: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m attnflow.toys.train_scenes --family llava --out data/toy-llava-scenes

toy-idefics3-scenes: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m attnflow.toys.train_scenes --family idefics3 --out data/toy-idefics3-scenes

eval-toy-llava-scenes: $(STAMP)
	$(BIN)/attnflow eval --model toy-llava-scenes

eval-toy-idefics3-scenes: $(STAMP)
	$(BIN)/attnflow eval --model toy-idefics3-scenes

clean:
	rm -rf $(VENV) .venv-latest .venv-tools runs
