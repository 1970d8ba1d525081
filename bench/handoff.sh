#!/usr/bin/env bash
# Planned handoffs under load: starts the ledger topology as processes
# (3 control-plane replicas, 6 units with a ledger behind a sidecar), runs
# clients in every unit, moves shards N times with planned handoffs, and
# prints the write pause p50/p99 and the client-visible errors.
#
#   bench/handoff.sh [N]      (default 30 moves)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}
CELLMESH_BENCH_HANDOFFS=$n go test -count=1 -run TestLedgerHandoffBench -v -timeout 15m ./cmd/cellmesh 2>&1 |
	grep -E 'planned handoffs under load|^(--- |ok|FAIL)' 
