#!/bin/sh
# bench/vs_postfix.py with the project's venv (made by `make` if missing), run
# from the repository root. Options: see `bench/vs_postfix.sh --help`.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/spoold ] || make .venv/.installed >&2
exec .venv/bin/python bench/vs_postfix.py "$@"
