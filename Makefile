# Quick start: `make demo` (train the tiny model on CPU under mpirun) and `make test`.
# Every target runs scripts/setup.sh first (idempotent: Debian packages, the Python venv).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build install demo test check bundle fmt
# `make install` puts wrappers for `ulysses` and the venv's `mpirun` (as `ulysses-mpirun`) in $(PREFIX)/bin.
PREFIX ?= $(HOME)/.local
setup:
	@bash scripts/setup.sh

build: setup
	@$(ENV) cargo build

install: build
	@bash scripts/install.sh "$(PREFIX)"

demo: build
	@bash scripts/demo.sh

# cargo's tests (unit, multi-rank under mpirun, Hugging Face parity), then the Slurm path for
# real (installs slurm-wlm and munge, starts a local slurmctld + slurmd; needs root), then two
# nodes on this machine (network namespaces; mpirun and sbatch -N 2 over them; needs root).
test: setup
	@$(ENV) cargo build --tests && $(ENV) cargo test --no-fail-fast
	@bash tests/slurm/run_slurm_test.sh
	@bash tests/multinode/run.sh

check: build
	@for f in experiments/*.toml; do target/debug/ulysses check $$f || exit 1; done

bundle: build
	@$(ENV) cargo build --tests
	@$(ENV) bash scripts/make-bundle.sh

fmt:
	@$(ENV) cargo fmt
