# imacri: two commands.
#   make run   installs what is missing, starts containerd (CRI plugin off) and serves CRI
#   make test  installs what is missing and runs every test (unit + end-to-end)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo
ARGS ?=

.PHONY: deps build run test unit lint bench clean

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --bins

run: build
	@scripts/containerd-up.sh
	target/release/imacri serve $(ARGS)

# The end-to-end tests start their own containerd, registry and imacri.
test: deps
	@scripts/test.sh

# Side-by-side CRI latency against containerd's own CRI plugin, and the
# fanotify measurement costs next to unmeasured execs and openssl (needs root).
bench: deps
	$(CARGO) build --release --bins
	target/release/bench
	target/release/bench_ima
	target/release/bench_evidence

unit:
	$(CARGO) test --workspace --lib --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
