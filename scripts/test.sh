#!/usr/bin/env bash
# The test command (README, .ci/run): lint the scripts and workflows, bring up the services, check formatting
# and lints, run every test.
# Benchmarks are programs, not tests: clippy compiles them; `cargo bench` runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
bash scripts/services.sh
# The console's browser test (tests/console_browser.rs) drives Debian's headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y chromium chromium-driver
fi
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --lib --bins --tests --examples
cargo test --locked --doc
