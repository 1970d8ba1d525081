#!/usr/bin/env bash
# Benchmarks of the routing model: the per-request decision, lookup at
# N = 65,536, Compile, and every planner at 65,536 shards x 1,000 units.
# Usage: bench/routing.sh [count]   (default 6 runs of each; ~2 minutes)
# Prints benchstat's summary; raw results go to bench/out/routing.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-6}
mkdir -p bench/out
go test -run '^$' -bench . -benchmem -count "$count" ./routing/ | tee bench/out/routing.txt
go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da bench/out/routing.txt
