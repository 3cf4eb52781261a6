#!/usr/bin/env bash
# Check that a release tag agrees with the one version of the repository, and extract its release notes:
#
#   bash scripts/release-check.sh v0.2.0 notes.md
#
# The version lives in Cargo.toml ([package] version); the chart's version and appVersion must equal it (the test
# suite checks that too, tests/chart.rs), the tag must be v<version>, and CHANGELOG.md must have a
# "## [<version>] - YYYY-MM-DD" section, whose body is written to the notes file.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'release-check: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 2 ]] || fail "usage: $0 TAG NOTES_FILE"
tag=$1 notes=$2

crate=$(sed -n '/^\[package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml)
chart=$(sed -n 's/^version: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/flowcraft/Chart.yaml)
app=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/flowcraft/Chart.yaml)

[[ -n "$crate" ]] || fail "no [package] version in Cargo.toml"
[[ "$tag" == "v$crate" ]] || fail "tag $tag does not match Cargo.toml's version $crate (expected v$crate)"
[[ "$chart" == "$crate" ]] || fail "charts/flowcraft/Chart.yaml version $chart != Cargo.toml's $crate"
[[ "$app" == "$crate" ]] || fail "charts/flowcraft/Chart.yaml appVersion $app != Cargo.toml's $crate"

# The section's body: from its heading to the next "## [" heading (or the link references at the end).
awk -v v="$crate" '
  index($0, "## [" v "] - ") == 1 { found = 1; next }
  found && (/^## \[/ || /^\[[^]]+\]: /) { exit }
  found { print }
  END { if (!found) exit 1 }
' CHANGELOG.md > "$notes" || fail "CHANGELOG.md has no \"## [$crate] - YYYY-MM-DD\" section"
grep -q '[^[:space:]]' "$notes" || fail "the CHANGELOG.md section of $crate is empty"
printf 'release-check: %s agrees with Cargo.toml and the chart; notes in %s\n' "$tag" "$notes" >&2
