#!/usr/bin/env bash
# The control-plane example: three control-plane replicas (one per region,
# raft on disk), the local example's four units with an echo behind a sidecar
# in each, the sidecars taking their map and endpoints over xDS. It moves a
# user's shard with the CLI and shows the traffic follow, kills the raft
# leader with SIGKILL and moves the shard back through the survivors.
#
#   examples/controlplane/run.sh          run the story, stop
#   examples/controlplane/run.sh --keep   ... and leave it running until Ctrl-C
#
# Ports: replicas 177x0 (API), 177x1 (xDS), 177x2 (raft), 177x3 (gossip);
# sidecars 161xx-165xx;
# echo apps 1820x, all on 127.0.0.1. Logs and data go to a temporary directory
# (printed), or $CELLMESH_LOGS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
keep=false
case "${1:-}" in
	--keep) keep=true ;;
	"") ;;
	*) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac
command -v curl >/dev/null || { echo "this example needs curl" >&2; exit 1; }

work=$(mktemp -d)
logs=${CELLMESH_LOGS:-$work/logs}
mkdir -p "$logs"
pids=()
declare -A pid
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
	rm -rf "$work/bin" "$work/data"
	exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$root"
echo "building cellmesh and the echo service..."
go build -o "$work/bin/cellmesh" ./cmd/cellmesh
go build -o "$work/bin/echo" ./examples/echo/cmd/echo
cellmesh="$work/bin/cellmesh"

certs="$here/certs"
if [ ! -f "$certs/ca.pem" ]; then
	"$cellmesh" certs init --dir "$certs" --trust-domain cellmesh.local >/dev/null
fi
[ -f "$certs/gossip.key" ] || "$cellmesh" gossip-key >"$certs/gossip.key"
issue() { # region unit service
	[ -f "$certs/$2-$3.pem" ] || "$cellmesh" certs issue --dir "$certs" --region "$1" --unit "$2" --service "$3" >/dev/null
}
export CELLMESH_TOKEN=${CELLMESH_TOKEN:-$(head -c 18 /dev/urandom | base64)}
export CELLMESH_API=http://127.0.0.1:17700

# Three replicas: cp-us starts the cluster with the topology, the others join.
i=0
for pair in cp-us:us-east cp-eu:eu-west cp-ap:ap-south; do
	id=${pair%%:*} region=${pair##*:}
	issue "$region" "$id" cellmesh-controlplane
	args=(controlplane --id "$id" --region "$region" --data-dir "$work/data/$id"
		--api "127.0.0.1:177${i}0" --xds "127.0.0.1:177${i}1" --raft "127.0.0.1:177${i}2"
		--tls-ca "$certs/ca.pem" --tls-cert "$certs/$id-cellmesh-controlplane.pem" --tls-key "$certs/$id-cellmesh-controlplane-key.pem"
		--gossip "127.0.0.1:177${i}3" --gossip-key-file "$certs/gossip.key" --gossip-profile fast)
	if [ $i -gt 0 ]; then args+=(--gossip-join 127.0.0.1:17703); fi
	if [ $i -eq 0 ]; then args+=(--topology "$root/examples/local/topology.yaml"); else args+=(--join 127.0.0.1:17700); fi
	"$cellmesh" "${args[@]}" >"$logs/$id.log" 2>&1 &
	pids+=($!)
	pid[$id]=$!
	i=$((i + 1))
done

# Four units: an echo and its sidecar in each.
i=0
for pair in us-east-1:us-east us-east-2:us-east eu-west-1:eu-west eu-west-2:eu-west; do
	i=$((i + 1))
	unit=${pair%%:*} region=${pair##*:}
	issue "$region" "$unit" echo
	"$work/bin/echo" --listen "127.0.0.1:1820$i" --unit "$unit" --region "$region" --service echo >"$logs/echo-$unit.log" 2>&1 &
	pids+=($!)
	"$cellmesh" sidecar --config "$here/$unit.yaml" >"$logs/sidecar-$unit.log" 2>&1 &
	pids+=($!)
done
echo "started 3 control-plane replicas, 4 echo services and 4 sidecars; logs in $logs"

wait_for() { # what, command...
	local what=$1; shift
	for _ in $(seq 1 300); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.1
	done
	echo "timed out waiting for $what" >&2
	return 1
}
for a in 16401 16402 16403 16404; do
	wait_for "the sidecar on admin port $a" curl -sf "http://127.0.0.1:$a/readyz"
done
registered() {
	local s
	s=$("$cellmesh" status) || return 1
	[ "$(printf '%s\n' "$s" | grep -cE '^(us|eu)-(east|west)-[12] .* 1 +[0-9.]+m?s$')" -eq 4 ]
}
wait_for "every sidecar to register" registered
echo
"$cellmesh" status
echo

# where UID: the unit whose echo answers a request for UID sent into us-east-1.
where() {
	curl -s -H 'Host: echo' -H "x-cellmesh-uid: $1" http://127.0.0.1:16101/ | sed -n 's/.*"unit": *"\([^"]*\)".*/\1/p'
}
uid=2088000000007
echo "user $uid (shard 7) is answered by: $(where $uid)"
echo "\$ cellmesh move 7 --to eu-west-1"
"$cellmesh" move 7 --to eu-west-1
# The move is pushed when the command returns; the sidecars apply it within
# milliseconds.
at() { [ "$(where "$1")" = "$2" ]; }
wait_for "the move to reach the traffic" at $uid eu-west-1
echo "user $uid is now answered by: $(where $uid)"

leader=$("$cellmesh" status | sed -n 's/^control plane: leader \([^,]*\),.*/\1/p')
echo
echo "killing the raft leader $leader with SIGKILL..."
kill -KILL "${pid[$leader]}"
case $leader in cp-us) export CELLMESH_API=http://127.0.0.1:17710 ;; esac
newleader() {
	local s
	s=$("$cellmesh" status) || return 1
	case $s in *"leader $leader,"* | *"leader NONE"*) return 1 ;; esac
}
wait_for "a new leader" newleader
s=$("$cellmesh" status)
printf '%s\n' "${s%%$'\n'*}"
echo "\$ cellmesh move 7 --to us-east-1"
"$cellmesh" move 7 --to us-east-1
wait_for "the move after the leader's loss to reach the traffic" at $uid us-east-1
echo "user $uid is answered by: $(where $uid)"
echo
echo "the mesh kept routing through the loss of the leader; moves reach every sidecar"

if $keep; then
	cat <<MSG

The mesh keeps running until Ctrl-C (CELLMESH_API=$CELLMESH_API CELLMESH_TOKEN=$CELLMESH_TOKEN). Try:
  $cellmesh status
  $cellmesh shards --unit eu-west-1
  $cellmesh move 12 --to eu-west-2
  curl -s -H 'Host: echo' -H 'x-cellmesh-uid: 2088000000012' http://127.0.0.1:16101/
MSG
	wait
fi
