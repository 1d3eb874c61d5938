# Two set-up commands: `make demo` and `make test`. Everything else is optional.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lab toy-vlm eval-toy-vlm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel on local disk; pyproject keeps a range it satisfies.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnflow run --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q --nbmake -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

toy-vlm: $(STAMP)
	$(BIN)/python -m attnflow.toys.train_toy_vlm --out data/toy-vlm

eval-toy-vlm: $(STAMP)
	$(BIN)/attnflow eval --model toy-vlm

clean:
	rm -rf $(VENV) runs
