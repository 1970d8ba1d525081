#!/usr/bin/env bash
# Gossip failure detection on this machine (bench/gossip): detection time
# after a member stops without leaving, per profile and pool size; and,
# with --soak, the false-death soak (one member paused with SIGSTOP for
# 300 ms every 5 s; want 0 false deaths).
#
#   bench/gossip.sh                 detection: fast at 10 and 50, lan at 10
#   bench/gossip.sh --soak [10m]    the soak, fast profile, 10 members
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(mktemp -d)/gossip
trap 'rm -rf "$(dirname "$bin")"' EXIT
go build -o "$bin" ./bench/gossip
if [ "${1:-}" = "--soak" ]; then
	"$bin" -mode soak -profile fast -members 10 -duration "${2:-10m}"
	exit
fi
"$bin" -mode detect -profile fast -members 10 -kills 30
"$bin" -mode detect -profile fast -members 50 -kills 30
"$bin" -mode detect -profile lan -members 10 -kills 10
