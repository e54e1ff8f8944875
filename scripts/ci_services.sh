#!/usr/bin/env bash
# The services the multi-node tests need, installed (Debian packages, only when missing) and started:
# PostgreSQL for a shared Optuna study (scripts/local_postgres.sh) and a one-node SLURM cluster
# (scripts/local_slurm.sh). Safe to run again. Progress goes to stderr; stdout is the one line to
# evaluate, so that CI (and a developer) can write
#   eval "$(bash scripts/ci_services.sh)"
# to get BLOODCELL_TEST_POSTGRES set. tests/test_slurm.py and tests/test_multi_node.py then run for real.
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
export_line=$(bash local_postgres.sh --install | grep "^export " | tail -n 1)
bash local_slurm.sh --install >&2
echo "ci_services: PostgreSQL and SLURM up in $(($(date +%s) - start)) s" >&2
echo "$export_line"
