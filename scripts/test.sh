#!/usr/bin/env bash
# The test command (README, .ci/run): lint the scripts and workflows, bring up the services, check formatting
# and lints, run every test.
# Benchmarks are programs, not tests: clippy compiles them; `cargo bench` runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
bash scripts/services.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --lib --bins --tests --examples
cargo test --locked --doc
