# The one task runner: the README and CI call these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATABASE ?= sqlite:///var/spendgate.db
ADDRESS ?= 127.0.0.1:50051

.PHONY: install serve test lint typecheck proto migrate bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

migrate: install
	mkdir -p var
	$(BIN)/spendgate migrate --database $(DATABASE)

serve: migrate
	$(BIN)/spendgate serve --address $(ADDRESS) --policies policies --database $(DATABASE)

test: install
	$(BIN)/spendgate validate policies
	$(BIN)/spendgate test policies
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check service tests examples
	$(BIN)/ruff format --check service tests examples
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

proto: install
	$(BIN)/python -m grpc_tools.protoc --proto_path=proto \
		--python_out=service --pyi_out=service --grpc_python_out=service \
		proto/spendgate/v1/spendgate.proto

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
