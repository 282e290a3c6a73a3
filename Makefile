# Quick start: `make demo` (train the tiny model on CPU under mpirun) and `make test`.
# Every target runs scripts/setup.sh first (idempotent: Debian packages, the Python venv).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo test check bundle fmt
setup:
	@bash scripts/setup.sh

build: setup
	@$(ENV) cargo build

demo: build
	@bash scripts/demo.sh

test: setup
	@$(ENV) cargo build --tests && $(ENV) cargo test --no-fail-fast

check: build
	@for f in experiments/*.toml; do target/debug/ulysses check $$f || exit 1; done

bundle: build
	@$(ENV) bash scripts/make-bundle.sh

fmt:
	@$(ENV) cargo fmt
