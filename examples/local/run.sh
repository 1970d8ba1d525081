#!/usr/bin/env bash
# The local example: two regions x two units, an echo service in each unit
# behind a cellmesh sidecar, talking HTTP/3 over QUIC with mutual TLS (and
# HTTP/2 over TLS to eu-west-2, as if its network dropped UDP).
#
#   examples/local/run.sh          start it, send users' requests, stop
#   examples/local/run.sh --keep   ... and leave it running until Ctrl-C
#
# It builds cellmesh and the echo, makes a development mesh CA and one
# certificate per sidecar under examples/local/certs (once), starts the 8
# processes on 127.0.0.1 (ports 151xx-154xx, 181xx), and sends requests for
# a few users through us-east-1's sidecar. Logs go to $CELLMESH_LOGS
# (default: a temporary directory, printed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
keep=false
case "${1:-}" in
	--keep) keep=true ;;
	"") ;;
	*) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
logs=${CELLMESH_LOGS:-$work/logs}
mkdir -p "$logs"
pids=()
cleanup() {
	status=$?
	if [ ${#pids[@]} -gt 0 ]; then
		kill -TERM "${pids[@]}" 2>/dev/null || true
		wait "${pids[@]}" 2>/dev/null || true
	fi
	if [ $status -ne 0 ]; then
		echo "--- the example failed; last log lines:" >&2
		tail -n 5 "$logs"/*.log >&2 || true
	fi
	rm -rf "$work/bin"
	exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$root"
echo "building cellmesh and the echo service..."
go build -o "$work/bin/cellmesh" ./cmd/cellmesh
go build -o "$work/bin/echo" ./examples/echo/cmd/echo
go build -o "$work/bin/client" ./examples/local/client
cellmesh="$work/bin/cellmesh"

certs="$here/certs"
if [ ! -f "$certs/ca.pem" ]; then
	"$cellmesh" certs init --dir "$certs" --trust-domain cellmesh.local
fi
units="us-east-1:us-east us-east-2:us-east eu-west-1:eu-west eu-west-2:eu-west"
i=0
for pair in $units; do
	i=$((i + 1))
	unit=${pair%%:*} region=${pair##*:}
	if [ ! -f "$certs/$unit-echo.pem" ]; then
		"$cellmesh" certs issue --dir "$certs" --region "$region" --unit "$unit" --service echo >/dev/null
	fi
	"$work/bin/echo" --listen "127.0.0.1:1810$i" --unit "$unit" --region "$region" --service echo >"$logs/echo-$unit.log" 2>&1 &
	pids+=($!)
	"$cellmesh" sidecar --config "$here/$unit.yaml" >"$logs/sidecar-$unit.log" 2>&1 &
	pids+=($!)
done
echo "started 4 echo services and 4 sidecars; logs in $logs"
echo

"$work/bin/client" --config "$here/us-east-1.yaml"

if $keep; then
	cat <<MSG

The mesh keeps running until Ctrl-C. Try:
  curl -s -H 'Host: echo' -H 'x-cellmesh-uid: 2088123456789' http://127.0.0.1:15101/hello
  curl -s http://127.0.0.1:15401/config      # us-east-1's map, version and peers
  curl -s http://127.0.0.1:15401/metrics | grep cellmesh_requests_total
MSG
	wait
fi
