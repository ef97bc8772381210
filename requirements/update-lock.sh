#!/usr/bin/env bash
# Regenerate requirements/lock-cpu.txt: the exact versions of every package the tests, the demo, the benchmarks and
# CI install (all extras, CPU build of torch, Python 3.11 on Linux x86_64). Run from anywhere:
#   bash requirements/update-lock.sh            (needs `pip install uv`)
# then run the test suite against the new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra dev --extra eval --extra ui --extra ui-test --extra cluster --extra upscale \
    -c constraints-cpu.txt --find-links /opt/wheels --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/update-lock.sh" -o requirements/lock-cpu.txt "$@"
