#!/usr/bin/env bash
# The soak (issue #10): tests/soak.sh MINUTES [DEVICES]
# Random I/O on several file-backed devices of one vcdev, every byte checked
# against a model, with IOTLB churn, reconnects, live resizes and daemon
# restarts (see tests/soak_run.rs); ends with one summary line and exits
# non-zero on any mismatch or failed request.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:?usage: tests/soak.sh MINUTES [DEVICES]}"
exec cargo test --release -q -p vcdev-tests --test soak_run -- "$minutes" "${2:-3}"
