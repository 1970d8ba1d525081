#!/usr/bin/env bash
# Benchmark of the control plane's xDS push (issue 4, item 8): from a
# shard move accepted by the operator API to the last of N ADS clients
# holding (and ACKing) the new shard map, for N = 100, 1,000 and 5,000
# clients and shard maps of 100 and 10,000 shards (10,000 twice: owned in
# ranges, and interleaved, the worst case); and the control plane's
# CPU per push per client and memory per connected client.
#
# For each map size and N it starts a fresh single-replica control plane
# (`cellmesh controlplane`, raft on local disk, mutual TLS), then runs
# bench/xdsload: N ADS streams on a gRPC connection each (one client
# certificate for all), subscribed to the clusters and the shard map as a
# sidecar is, ACKing every response (the clients read every byte but
# decode only the map's version). When all hold the map, xdsload moves
# one shard $ROUNDS (30) times through the API, alternating it between two
# units, $INTERVAL (300ms) apart, and times each round: from the move's
# answer ("accepted": committed through raft and published) and from the
# request being sent, to the last client's receipt of the new map, to its
# ACK, and to the server having counted every ACK (polled on /metrics,
# ±2 ms). The control plane's CPU comes from process_cpu_seconds_total
# over the rounds (the benchmark's own scrapes taken out), less what a
# move costs with no client connected (measured first), per client; its
# memory from /metrics before and after the clients connected. Control
# plane and clients share the machine's CPUs (no pinning); the clients'
# own CPU is shown beside.
#
# Usage: bench/controlplane.sh               (about 5 minutes on an idle machine,
#                                            up to 9 on a busy one)
#        PROFILE=1 bench/controlplane.sh     run a bench build of the replica
#                                            with net/http/pprof (bench/xdsload/replica)
#                                            and save CPU (PROFILE_SECONDS, 10) and heap
#                                            profiles of every run in bench/out/controlplane/
# Knobs (environment): CLIENTS ("100 1000 5000"), SHARDS ("100 10000 10000x":
# a count, x for the interleaved layout; see topology below),
# ROUNDS (30), INTERVAL (300ms), NICE (-19 when allowed), CP_ENV (extra
# environment of the control plane, e.g. GOGC=200, for experiments), CP_BIN
# (a cellmesh binary to measure instead of building one: A/B runs);
# QUIET_WAIT (30 s), QUIET_BUDGET (60 s), MAX_OTHER (10 %), ATTEMPTS (2):
# the machine may be shared, so each run waits for an idle machine, counts
# the CPU used meanwhile by processes that are not the benchmark's ("other
# load", % of one CPU), and a run disturbed by more than MAX_OTHER is done
# again (ATTEMPTS in all; none after RETRY_UNTIL, 330 s, into the
# benchmark, to bound its time), keeping the least disturbed.
#
# Loopback only (127.0.0.1); everything it starts is stopped on exit.
# Raw outputs (one key=value line per run, every round as CSV, logs) go to
# bench/out/controlplane/; the summary (markdown) is printed and saved
# there as summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

CLIENTS=${CLIENTS:-"100 1000 5000"}
SHARDS=${SHARDS:-"100 10000 10000x"}
ROUNDS=${ROUNDS:-30}
INTERVAL=${INTERVAL:-300ms}
NICE=${NICE:--19}
PROFILE=${PROFILE:-0}
PROFILE_SECONDS=${PROFILE_SECONDS:-10}
CP_ENV=${CP_ENV:-}
QUIET_WAIT=${QUIET_WAIT:-30}
QUIET_BUDGET=${QUIET_BUDGET:-60}
MAX_OTHER=${MAX_OTHER:-10}
ATTEMPTS=${ATTEMPTS:-2}
RETRY_UNTIL=${RETRY_UNTIL:-330} # no run is repeated after this many seconds of the benchmark

die() { echo "bench/controlplane.sh: $*" >&2; exit 1; }
for t in go curl ss awk; do command -v "$t" >/dev/null || die "$t is not installed"; done

# Every client holds a connection: both processes need a descriptor per
# client and some.
most=0
for n in $CLIENTS; do [ "$n" -gt "$most" ] && most=$n; done
need=$((most + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
	ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
	[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need" ] ||
		die "open files limit $(ulimit -n) (hard $(ulimit -Hn)): $need needed for $most clients; raise it (ulimit -n) as root"
fi

# --- work area, cleanup ----------------------------------------------------
out=$root/bench/out/controlplane
rm -rf "$out"
mkdir -p "$out/logs"
work=$(mktemp -d)
cp_pid=
load_pid=
stop_cp() {
	if [ -n "$cp_pid" ]; then
		kill -TERM "$cp_pid" 2>/dev/null || true
		for _ in $(seq 100); do
			kill -0 "$cp_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$cp_pid" 2>/dev/null || true
		wait "$cp_pid" 2>/dev/null || true
		cp_pid=
	fi
}
cleanup() {
	status=$?
	if [ -n "$load_pid" ]; then
		kill -TERM "$load_pid" 2>/dev/null || true
		wait "$load_pid" 2>/dev/null || true
	fi
	stop_cp
	if [ $status -ne 0 ]; then
		echo "--- bench/controlplane.sh failed; last log lines ($out/logs):" >&2
		tail -n 5 "$out"/logs/*.log >&2 2>/dev/null || true
	fi
	rm -rf "$work"
	exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh" # freeport, quiet

nice -n "$NICE" true 2>/dev/null && [ "$(nice -n "$NICE" nice)" = "$NICE" ] || NICE=0


# snap: S_WALL (µs), S_SYS (busy jiffies of the machine), S_OURS (jiffies
# of the control plane and of finished children of this shell: xdsload).
snap() {
	local j=0
	if [ -n "$cp_pid" ]; then
		j=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$cp_pid/stat" 2>/dev/null) || j=0
	fi
	times >"$work/times"
	S_OURS=$((${j:-0} + $(awk 'NR == 2 { n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } printf "%d", n * 100 }' "$work/times")))
	S_SYS=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat)
	S_WALL=${EPOCHREALTIME/./}
}
# others WALL SYS OURS: % of one CPU used by others since that snap.
others() {
	awk -v w=$((S_WALL - $1)) -v j=$((S_SYS - $2 - (S_OURS - $3))) \
		'BEGIN { v = j * 1e6 / w; if (v < 0) v = 0; printf "%.0f", v }'
}

# --- machine ---------------------------------------------------------------
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -c . || true)
{
	echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
	echo "machine: $(nproc) CPUs, $cpu_model, $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
	echo "go: $(go env GOVERSION); commit $commit$([ "$dirty" -gt 0 ] && echo " with $dirty changed files in the working tree")"
	echo "runs: clients $CLIENTS; shards $SHARDS; $ROUNDS rounds $INTERVAL apart; nice $NICE; no pinning${CP_ENV:+; control plane environment: $CP_ENV}${CP_BIN:+; control plane binary: $CP_BIN}"
	echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt"

# --- build -----------------------------------------------------------------
echo "building cellmesh and xdsload..."
mkdir -p "$work/bin"
# A name of its own, so that another job's "pkill cellmesh" on a shared
# machine does not stop the benchmark's replica.
if [ -n "${CP_BIN:-}" ]; then
	cp "$CP_BIN" "$work/bin/bench-cp" # an A/B run against a binary built elsewhere
else
	go build -o "$work/bin/bench-cp" ./cmd/cellmesh
fi
go build -o "$work/bin/xdsload" ./bench/xdsload
if [ "$PROFILE" = 1 ]; then
	go build -o "$work/bin/bench-cp-pprof" ./bench/xdsload/replica
fi

# --- certificates, topologies ----------------------------------------------
certs=$work/certs
"$work/bin/bench-cp" certs init --dir "$certs" --trust-domain bench.local >/dev/null
"$work/bin/bench-cp" certs issue --dir "$certs" --region us-east --unit cp-1 --service cellmesh-controlplane >/dev/null
"$work/bin/bench-cp" certs issue --dir "$certs" --region us-east --unit us-east-1 --service xdsload >/dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"

# topology FILE SPEC: two regions of two units, a quarter of the shards on
# each unit with its standby in the other region (as
# examples/local/topology.yaml), shard i by uid mod SHARDS. SPEC is the
# shard count, each unit owning one range (as operators write maps, and
# as the map travels: in runs, a few hundred bytes at any size), or the
# count followed by x: shard i on unit i mod 4, the worst case, where no
# two neighbouring shards share an owner and the map travels shard by
# shard.
topology() {
	local n=${2%x} q=$((${2%x} / 4))
	cat >"$1" <<EOF
version: 1
shards: $n
shard_rule:
  kind: mod
regions:
  - name: us-east
  - name: eu-west
units:
  - {name: us-east-1, region: us-east, kind: rzone, capacity_rps: 5000}
  - {name: us-east-2, region: us-east, kind: rzone, capacity_rps: 5000}
  - {name: eu-west-1, region: eu-west, kind: rzone, capacity_rps: 5000}
  - {name: eu-west-2, region: eu-west, kind: rzone, capacity_rps: 5000}
assignments:
EOF
	if [ "$2" = "$n" ]; then
		cat >>"$1" <<EOF
  - {shards: 0-$((q - 1)), primary: us-east-1, standbys: [eu-west-1]}
  - {shards: $q-$((2 * q - 1)), primary: us-east-2, standbys: [eu-west-2]}
  - {shards: $((2 * q))-$((3 * q - 1)), primary: eu-west-1, standbys: [us-east-1]}
  - {shards: $((3 * q))-$((n - 1)), primary: eu-west-2, standbys: [us-east-2]}
EOF
	else
		awk -v n="$n" 'BEGIN {
			split("us-east-1 us-east-2 eu-west-1 eu-west-2", p, " "); split("eu-west-1 eu-west-2 us-east-1 us-east-2", b, " ")
			for (i = 0; i < n; i++) printf "  - {shards: %d, primary: %s, standbys: [%s]}\n", i, p[i % 4 + 1], b[i % 4 + 1]
		}' >>"$1"
	fi
}
# label SPEC: how a map is named in the summary.
label() { case $1 in *x) echo "${1%x} interleaved" ;; *) echo "$1 in ranges" ;; esac; }
for s in $SHARDS; do
	case $s in *[!0-9x]* | x* | *x?*) die "SHARDS: $s is not a shard count, with or without x" ;; esac
	[ "${s%x}" -ge 4 ] && [ $((${s%x} % 4)) = 0 ] || die "SHARDS: ${s%x} is not a multiple of 4"
	topology "$work/topology-$s.yaml" "$s"
	"$work/bin/bench-cp" topology validate "$work/topology-$s.yaml" >/dev/null
done
cp "$work"/topology-*.yaml "$out/"

# --- runs ------------------------------------------------------------------
# start_cp SHARDS: a fresh replica with the map of SHARDS shards.
start_cp() {
	local s=$1 data
	data=$(mktemp -d "$work/data.XXXX")
	freeport raft
	freeport api
	freeport xds
	freeport pprof
	local cmd=("$work/bin/bench-cp" controlplane --id cp-1 --region us-east --log-level warn)
	if [ "$PROFILE" = 1 ]; then
		cmd=("$work/bin/bench-cp-pprof" --id cp-1 --pprof "127.0.0.1:$pprof")
	fi
	# shellcheck disable=SC2086 # CP_ENV is a list of VAR=value words
	nice -n "$NICE" env $CP_ENV "${cmd[@]}" --data-dir "$data" \
		--raft "127.0.0.1:$raft" --api "127.0.0.1:$api" --xds "127.0.0.1:$xds" \
		--topology "$work/topology-$s.yaml" --token-file "$work/token" \
		--tls-ca "$certs/ca.pem" --tls-cert "$certs/cp-1-cellmesh-controlplane.pem" \
		--tls-key "$certs/cp-1-cellmesh-controlplane-key.pem" >>"$out/logs/cp-$s.log" 2>&1 &
	cp_pid=$!
	for _ in $(seq 200); do
		if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$api/readyz" 2>/dev/null &&
			curl -fsS --max-time 2 -H "Authorization: Bearer $(cat "$work/token")" "http://127.0.0.1:$api/v1/shards/0" 2>/dev/null | grep -q '"unit"'; then
			return 0
		fi
		kill -0 "$cp_pid" 2>/dev/null || die "the control plane exited (see $out/logs/cp-$s.log)"
		sleep 0.1
	done
	die "the control plane did not become ready (see $out/logs/cp-$s.log)"
}

# kv FILE KEY: a value from xdsload's key=value line.
kv() { tr ' ' '\n' <"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

declare -A other
for s in $SHARDS; do
	for n in $CLIENTS; do
		best=
		for attempt in $(seq "$ATTEMPTS"); do
			echo "shards $s, clients $n: $ROUNDS moves${best:+ (again: disturbed)}..."
			start_cp "$s"
			quiet "shards $s clients $n"
			snap
			s0=("$S_WALL" "$S_SYS" "$S_OURS")
			f=$out/run-$s-$n.$attempt.txt
			prof=()
			if [ "$PROFILE" = 1 ]; then
				prof=(--cpu-profile-url "http://127.0.0.1:$pprof/debug/pprof/profile?seconds=$PROFILE_SECONDS"
					--cpu-profile "$out/cpu-$s-$n.$attempt.pprof"
					--heap-profile-url "http://127.0.0.1:$pprof/debug/pprof/heap"
					--heap-profile "$out/heap-$s-$n.$attempt.pprof")
			fi
			nice -n "$NICE" "$work/bin/xdsload" --xds "127.0.0.1:$xds" --api "http://127.0.0.1:$api" \
				--token-file "$work/token" --tls-ca "$certs/ca.pem" \
				--tls-cert "$certs/us-east-1-xdsload.pem" --tls-key "$certs/us-east-1-xdsload-key.pem" \
				--clients "$n" --rounds "$ROUNDS" --interval "$INTERVAL" --shard 0 --units us-east-1,eu-west-1 \
				--rounds-out "$out/rounds-$s-$n.$attempt.csv" "${prof[@]}" \
				>"$f" 2>"$out/logs/xdsload-$s-$n.$attempt.log" &
			load_pid=$!
			wait "$load_pid" || die "xdsload failed (shards $s, clients $n): $(tail -n 3 "$out/logs/xdsload-$s-$n.$attempt.log")"
			load_pid=
			snap
			o=$(others "${s0[@]}")
			stop_cp
			echo "    $(cat "$f") other=${o}%"
			if [ -z "$best" ] || [ "$o" -lt "${other[$s-$n]}" ]; then
				best=$attempt other[$s-$n]=$o
				cp "$f" "$out/run-$s-$n.txt"
				cp "$out/rounds-$s-$n.$attempt.csv" "$out/rounds-$s-$n.csv"
			fi
			if [ "$o" -le "$MAX_OTHER" ] || [ $SECONDS -ge "$RETRY_UNTIL" ]; then break; fi
		done
	done
done

# --- summary ---------------------------------------------------------------
met() { awk -v c="$1" 'BEGIN { print (c ? "**met**" : "**not met**") }'; }
{
	echo
	echo "### From the move to the last client ($ROUNDS moves per row; ms; p50 / p99 / max over the moves)"
	echo
	echo "| shards | map bytes | clients | accepted → last client has it | sent → last client has it | accepted → server counted the last ACK | move API answer (p50) | accepted → median client (p50) | connect all (s) | other load |"
	echo "|---|---|---|---|---|---|---|---|---|---|"
	for s in $SHARDS; do
		for n in $CLIENTS; do
			f=$out/run-$s-$n.txt
			echo "| $(label "$s") | $(kv "$f" map_bytes) | $n | $(kv "$f" last_p50_ms) / $(kv "$f" last_p99_ms) / $(kv "$f" last_max_ms) |" \
				"$(kv "$f" sent_last_p50_ms) / $(kv "$f" sent_last_p99_ms) / $(kv "$f" sent_last_max_ms) |" \
				"$(kv "$f" srvack_p50_ms) / $(kv "$f" srvack_p99_ms) / $(kv "$f" srvack_max_ms) |" \
				"$(kv "$f" api_p50_ms) | $(kv "$f" client_p50_ms) | $(kv "$f" connect_s) | ${other[$s-$n]}% |"
		done
	done
	echo
	echo "### Control plane CPU and memory"
	echo
	echo "| shards | clients | CPU per move (ms) | of which with no client (ms) | CPU per move per client (µs) | RSS no client → all connected (MiB) | RSS per client (KiB) | heap in use per client (KiB) | goroutines per client | xdsload CPU per move (ms) |"
	echo "|---|---|---|---|---|---|---|---|---|---|"
	for s in $SHARDS; do
		for n in $CLIENTS; do
			f=$out/run-$s-$n.txt
			r=$(kv "$f" rounds)
			echo "| $(label "$s") | $n | $(kv "$f" cp_cpu_ms_per_move) | $(kv "$f" cp_idle_cpu_ms_per_move) | $(kv "$f" cp_cpu_us_per_push_client) |" \
				"$(kv "$f" cp_rss_before_mib) → $(kv "$f" cp_rss_mib) | $(kv "$f" cp_rss_kib_per_client) | $(kv "$f" cp_heap_kib_per_client) |" \
				"$(kv "$f" cp_goroutines_per_client) | $(awk -v c="$(kv "$f" load_cpu_s)" -v r="$r" 'BEGIN { printf "%.1f", c * 1000 / r }') |"
		done
	done
	echo
	echo "### Targets (accepted → the last client has the new map, p99 over the moves)"
	echo
	for s in $SHARDS; do
		for n in $CLIENTS; do
			f=$out/run-$s-$n.txt
			case $n in
			1000) limit=100 ;;
			5000) limit=200 ;;
			*) continue ;;
			esac
			p=$(kv "$f" last_p99_ms)
			echo "- $n clients, $(label "$s") shards: ${p} ms against ${limit} ms: $(met "$(awk -v p="$p" -v l="$limit" 'BEGIN { print (p <= l) }')")" \
				"(server counted the last ACK: $(kv "$f" srvack_p99_ms) ms)"
		done
	done
	echo
	if [ -f "$out/notes.txt" ]; then echo "Runs that started on a busy machine: $(paste -sd';' "$out/notes.txt")"; fi
	echo "Total run time: ${SECONDS}s. Raw outputs: bench/out/controlplane/."
} | tee "$out/summary.md"
cat "$out/machine.txt" >>"$out/summary.md"
