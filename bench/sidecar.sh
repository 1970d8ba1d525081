#!/usr/bin/env bash
# Benchmarks of the sidecar's data path against a direct call, HAProxy and
# nginx, on one machine with fixed CPU pinning:
#
#   (a) direct   client -> echo
#   (b) sidecar  client -> sidecar A -> echo (uid homed in A's own unit: one hop)
#   (c) quic     client -> sidecar A -> HTTP/3 over QUIC -> sidecar B -> echo
#   (d) h2       the same as (c) with B's endpoint on HTTP/2 over TLS
#   (e) haproxy  client -> HAProxy -> echo   (nbthread 1, keep-alive upstream)
#       nginx    client -> nginx -> echo     (1 worker, keep-alive upstream)
#
# The load generator (bench/loadgen, or wrk) and the echo apps run on CPU 0;
# the proxies under test on CPU 1 (sidecars with GOMAXPROCS=1). Every request
# asks the echo for its tiny fixed answer (x-echo-small: 1).
#
# Runs, for each path:
#   latency     bench/loadgen, open loop at $RATE rps (1000) over $CONNS (16)
#               keep-alive connections for $LAT_SECONDS (10) after 2 s of
#               warm-up; latency from each request's scheduled send time
#   throughput  wrk -t1 -c$WRK_CONNS (64) -d${TPUT_SECONDS}s (10), closed loop
# and the sidecars' resident memory (VmRSS) idle, then while bench/loadgen
# sends $RSS_RATE rps (5000) for 10 s through path (b), before the
# throughput runs.
#
# Usage: bench/sidecar.sh            (3-4 minutes on an idle machine, up to ~6 on a
#                                    busy one; needs 2 CPUs, Linux)
#        PERF=1 bench/sidecar.sh     also profile CPU 1 with perf during the
#                                    sidecar throughput runs (bench/out/sidecar/perf-*.txt:
#                                    self time; perf-*-inclusive.txt: with callees)
# Knobs (environment): RATE CONNS LAT_SECONDS TPUT_SECONDS WRK_CONNS RSS_RATE
# as above; NICE (-19: every process of the benchmark runs at that niceness
# when allowed); SIDECAR_ENV (extra environment of the sidecars, such as
# GOGC=400, for experiments); QUIET_WAIT, MAX_OTHER, ATTEMPTS (below).
#
# The machine may be shared. Before each run the script waits up to
# QUIET_WAIT (30) s for both CPUs to be idle (QUIET_BUDGET, 60 s, for all
# the waits of a run); during each run it counts the
# CPU time used by processes that are not the benchmark's (and stolen by the
# hypervisor), in % of one CPU ("other load" in the tables). A run with more
# than MAX_OTHER (5) % is done again, ATTEMPTS (2) times in all, and the
# least disturbed attempt is kept.
#
# It installs haproxy, nginx-light and wrk with apt-get when they are
# missing (as root), builds cellmesh, the echo and the load generator, makes
# a throw-away mesh CA, and starts everything on free 127.0.0.1 ports; all
# of it is stopped and removed on exit. Raw outputs and logs go to
# bench/out/sidecar/; the summary (markdown) is printed and saved there as
# summary.md. Figures on a shared or busy machine move by 10-20%: read the
# ratios, which are measured in the same run, before the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

RATE=${RATE:-1000}
CONNS=${CONNS:-16}
LAT_SECONDS=${LAT_SECONDS:-10}
TPUT_SECONDS=${TPUT_SECONDS:-10}
WRK_CONNS=${WRK_CONNS:-64}
RSS_RATE=${RSS_RATE:-5000}
PERF=${PERF:-0}
NICE=${NICE:--19}       # every process of the benchmark, so that other work disturbs less
SIDECAR_ENV=${SIDECAR_ENV:-} # extra environment of the sidecars, e.g. GOGC=400, for experiments

UID_A=2088000000010 # shard 10: homed in unit a (bench/sidecar/topology.yaml)
UID_B=2088000000060 # shard 60: homed in unit b

die() { echo "bench/sidecar.sh: $*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------
need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
		die "missing ${need[*]}: install them (Debian: apt-get install haproxy nginx-light wrk)"
	echo "installing ${need[*]} with apt-get..."
	pkgs=()
	for p in "${need[@]}"; do
		case $p in nginx) pkgs+=(nginx-light) ;; *) pkgs+=("$p") ;; esac
	done
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	if ! apt-get install -y -qq "${pkgs[@]}" >/dev/null; then
		pkgs=("${pkgs[@]/nginx-light/nginx}") # nginx-light is gone from newer releases
		apt-get install -y -qq "${pkgs[@]}" >/dev/null
	fi
	# Debian starts the packaged services; stop them, we run our own.
	for s in haproxy nginx; do
		if command -v service >/dev/null; then service "$s" stop >/dev/null 2>&1 || true; fi
	done
fi
export PATH=$PATH:/usr/sbin:/sbin
for t in taskset ss curl haproxy nginx wrk go; do
	command -v "$t" >/dev/null || die "$t is not installed"
done
[ "$(nproc --all)" -ge 2 ] || die "needs at least 2 CPUs (CPU 0: client and echo; CPU 1: the proxies)"
taskset -c 0,1 true 2>/dev/null || die "cannot pin to CPUs 0 and 1 (taskset -c 0,1 failed)"

# --- work area, cleanup ----------------------------------------------------
out=$root/bench/out/sidecar
rm -rf "$out"
mkdir -p "$out/logs"
work=$(mktemp -d)
chmod 755 "$work" # nginx's worker runs as another user
pids=()
cleanup() {
	status=$?
	if [ ${#pids[@]} -gt 0 ]; then
		kill -TERM "${pids[@]}" 2>/dev/null || true
		for _ in $(seq 50); do
			kill -0 "${pids[@]}" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "${pids[@]}" 2>/dev/null || true
		wait 2>/dev/null || true
	fi
	if [ $status -ne 0 ]; then
		echo "--- bench/sidecar.sh failed; last log lines ($out/logs):" >&2
		tail -n 5 "$out"/logs/*.log >&2 2>/dev/null || true
	fi
	rm -rf "$work"
	exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh" # freeport, quiet

# on CPU CMD...: CMD pinned to CPU, at nice $NICE when allowed.
nice -n "$NICE" true 2>/dev/null && [ "$(nice -n "$NICE" nice)" = "$NICE" ] || NICE=0
on() {
	local cpu=$1
	shift
	nice -n "$NICE" taskset -c "$cpu" "$@"
}

# start NAME CPU CMD...: run CMD pinned to CPU, logging to logs/NAME.log.
declare -A pid
start() {
	local name=$1 cpu=$2
	shift 2
	nice -n "$NICE" taskset -c "$cpu" "$@" >"$out/logs/$name.log" 2>&1 &
	pids+=($!)
	pid[$name]=$!
}

# alive: every process of the benchmark still runs.
alive() {
	local p
	for p in "${!pid[@]}"; do
		kill -0 "${pid[$p]}" 2>/dev/null || die "$p (pid ${pid[$p]}) is gone: it crashed or something else on the machine killed it (see $out/logs/$p.log)"
	done
}

# waitok URL [curl args]: until URL answers 2xx (10 s at most).
waitok() {
	local url=$1
	shift
	for _ in $(seq 100); do
		curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null && return 0
		sleep 0.1
	done
	curl -fsS -o /dev/null --max-time 2 "$@" "$url" || die "$url did not answer"
}

# cpustat CPU: "busy total" jiffies of one CPU from /proc/stat.
cpustat() {
	awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# --- machine ---------------------------------------------------------------
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
read -r b0 t0 < <(cpustat 0)
read -r b1 t1 < <(cpustat 1)
sleep 1
read -r b0e t0e < <(cpustat 0)
read -r b1e t1e < <(cpustat 1)
quiet0=$(( (b0e - b0) * 100 / (t0e - t0 > 0 ? t0e - t0 : 1) ))
quiet1=$(( (b1e - b1) * 100 / (t1e - t1 > 0 ? t1e - t1 : 1) ))
{
	echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
	echo "machine: $(nproc) CPUs, $cpu_model, Linux $(uname -r)"
	echo "go: $(go env GOVERSION); $(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}'); $(nginx -v 2>&1 | sed 's|.*nginx/|nginx |'); $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')"
	echo "pinning: loadgen, wrk and the echo apps on CPU 0; sidecars (GOMAXPROCS=1), HAProxy (nbthread 1) and nginx (1 worker) on CPU 1; nice $NICE${SIDECAR_ENV:+; sidecar environment: $SIDECAR_ENV}"
	echo "busy before the run: CPU 0 ${quiet0}%, CPU 1 ${quiet1}% (load average $(cut -d' ' -f1-3 /proc/loadavg))"
} | tee "$out/machine.txt"
if [ "$quiet0" -gt 15 ] || [ "$quiet1" -gt 15 ]; then
	echo "WARNING: the machine is busy before the run; figures will be noisy" | tee -a "$out/machine.txt"
fi

# --- build -----------------------------------------------------------------
echo "building cellmesh, echo and loadgen..."
mkdir -p "$work/bin"
# Names of their own, so that another job's "pkill cellmesh" or "pkill
# echo" on a shared machine does not stop the benchmark's processes.
go build -o "$work/bin/bench-mesh" ./cmd/cellmesh
go build -o "$work/bin/bench-app" ./examples/echo/cmd/echo
go build -o "$work/bin/loadgen" ./bench/loadgen
cellmesh=$work/bin/bench-mesh

# --- certificates, configs -------------------------------------------------
certs=$work/certs
"$cellmesh" certs init --dir "$certs" --trust-domain bench.local >/dev/null
"$cellmesh" certs issue --dir "$certs" --region region-1 --unit a --service echo >/dev/null
"$cellmesh" certs issue --dir "$certs" --region region-2 --unit b --service echo >/dev/null
cp bench/sidecar/topology.yaml "$work/topology.yaml"

for v in echo_a echo_b \
	a_out a_quic a_tcp a_admin \
	a2_out a2_quic a2_tcp a2_admin \
	b_out b_quic b_tcp b_admin hap ngx; do
	freeport "$v"
done
# sidecar FILE REGION UNIT APP OUT QUIC TCP ADMIN B_ADDR B_TRANSPORT
sidecar_config() {
	sed -e "s|@REGION@|$2|g; s|@UNIT@|$3|g; s|@APP@|127.0.0.1:$4|; s|@OUTBOUND@|127.0.0.1:$5|" \
		-e "s|@INBOUND_QUIC@|127.0.0.1:$6|; s|@INBOUND_TCP@|127.0.0.1:$7|; s|@ADMIN@|127.0.0.1:$8|" \
		-e "s|@A_QUIC@|127.0.0.1:$a_quic|; s|@B_ADDR@|$9|; s|@B_TRANSPORT@|${10}|g" \
		bench/sidecar/sidecar.yaml.tmpl >"$1"
}
# A: b over QUIC; A2 (also unit a): b over HTTP/2 on TLS; B: serves both.
sidecar_config "$work/a.yaml" region-1 a "$echo_a" "$a_out" "$a_quic" "$a_tcp" "$a_admin" "127.0.0.1:$b_quic" quic
sidecar_config "$work/a2.yaml" region-1 a "$echo_a" "$a2_out" "$a2_quic" "$a2_tcp" "$a2_admin" "127.0.0.1:$b_tcp" h2
sidecar_config "$work/b.yaml" region-2 b "$echo_b" "$b_out" "$b_quic" "$b_tcp" "$b_admin" "127.0.0.1:$b_quic" quic
cp "$work"/a.yaml "$work"/a2.yaml "$work"/b.yaml "$out/"

cat >"$work/haproxy.cfg" <<EOF
global
	nbthread 1
	maxconn 4096
defaults
	mode http
	timeout connect 2s
	timeout client 30s
	timeout server 30s
	option http-keep-alive
	http-reuse always
frontend bench
	bind 127.0.0.1:$hap
	default_backend echo
backend echo
	server echo 127.0.0.1:$echo_a
EOF
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $out/logs/nginx-error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	client_body_temp_path $work/nginx/body;
	proxy_temp_path $work/nginx/proxy;
	fastcgi_temp_path $work/nginx/fastcgi;
	uwsgi_temp_path $work/nginx/uwsgi;
	scgi_temp_path $work/nginx/scgi;
	keepalive_requests 1000000;
	upstream echo {
		server 127.0.0.1:$echo_a;
		keepalive 128;
		keepalive_requests 1000000;
	}
	server {
		listen 127.0.0.1:$ngx;
		location / {
			proxy_pass http://echo;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host \$host;
		}
	}
}
EOF
cp "$work/haproxy.cfg" "$work/nginx.conf" "$out/"

# --- start -----------------------------------------------------------------
echo "starting echo x2 (CPU 0), sidecars A, A2, B, HAProxy, nginx (CPU 1)..."
start echo-a 0 env GOMAXPROCS=1 "$work/bin/bench-app" --listen "127.0.0.1:$echo_a" --unit a --region region-1 --service echo
start echo-b 0 env GOMAXPROCS=1 "$work/bin/bench-app" --listen "127.0.0.1:$echo_b" --unit b --region region-2 --service echo
start sidecar-a 1 env GOMAXPROCS=1 $SIDECAR_ENV "$cellmesh" sidecar --config "$work/a.yaml" --log-level warn
start sidecar-a2 1 env GOMAXPROCS=1 $SIDECAR_ENV "$cellmesh" sidecar --config "$work/a2.yaml" --log-level warn
start sidecar-b 1 env GOMAXPROCS=1 $SIDECAR_ENV "$cellmesh" sidecar --config "$work/b.yaml" --log-level warn
start haproxy 1 haproxy -db -f "$work/haproxy.cfg"
start nginx 1 nginx -p "$work/nginx" -c "$work/nginx.conf"

small=(-H 'x-echo-small: 1')
waitok "http://127.0.0.1:$echo_a/healthz"
waitok "http://127.0.0.1:$echo_b/healthz"
for adm in "$a_admin" "$a2_admin" "$b_admin"; do waitok "http://127.0.0.1:$adm/readyz"; done
waitok "http://127.0.0.1:$hap/healthz" -H 'Host: echo'
waitok "http://127.0.0.1:$ngx/healthz" -H 'Host: echo'
alive

names=(direct sidecar quic h2 haproxy nginx)
declare -A url uidh label
url[direct]=http://127.0.0.1:$echo_a/hello uidh[direct]=$UID_A
url[sidecar]=http://127.0.0.1:$a_out/hello uidh[sidecar]=$UID_A
url[quic]=http://127.0.0.1:$a_out/hello uidh[quic]=$UID_B
url[h2]=http://127.0.0.1:$a2_out/hello uidh[h2]=$UID_B
url[haproxy]=http://127.0.0.1:$hap/hello uidh[haproxy]=$UID_A
url[nginx]=http://127.0.0.1:$ngx/hello uidh[nginx]=$UID_A
label[direct]="(a) client → echo"
label[sidecar]="(b) client → sidecar → echo"
label[quic]="(c) client → sidecar A → QUIC → sidecar B → echo"
label[h2]="(d) client → sidecar A → HTTP/2+TLS → sidecar B → echo"
label[haproxy]="(e) client → HAProxy → echo"
label[nginx]="(e) client → nginx → echo"

# Every path must answer from the right unit before anything is measured.
for n in "${names[@]}"; do
	want=unit=a
	[ "${uidh[$n]}" = "$UID_B" ] && want=unit=b
	waitok "${url[$n]}" -H 'Host: echo' -H "x-cellmesh-uid: ${uidh[$n]}" "${small[@]}"
	got=$(curl -fsS -H 'Host: echo' -H "x-cellmesh-uid: ${uidh[$n]}" "${small[@]}" "${url[$n]}")
	case $got in "$want "*) ;; *) die "$n: answer '$got', want '$want ...'" ;; esac
done

# Idle memory: after one request each, before any load.
sleep 2
declare -A idle_rss
for s in sidecar-a sidecar-b; do idle_rss[$s]=$(rss_kib "${pid[$s]}"); done

# kv FILE KEY: a value from loadgen's key=value line.
kv() { tr ' ' '\n' <"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

# --- disturbance ---------------------------------------------------------
# The machine may be shared: every run counts the CPU time that processes
# other than the benchmark's used meanwhile (and the hypervisor stole), in
# % of one CPU. A run disturbed by more than $MAX_OTHER% is done again (at
# most $ATTEMPTS times in all); the least disturbed attempt is kept, and its
# figure is shown in the tables.
MAX_OTHER=${MAX_OTHER:-5}
ATTEMPTS=${ATTEMPTS:-2}
ourpids=("${pid[@]}")
for p in $(ps -o pid= --ppid "${pid[nginx]}"); do ourpids+=("$p"); done
snap() { # sets S_WALL (µs), S_SYS, S_OURS, S_KIDS (jiffies of 1/100 s)
	local p j
	S_OURS=0
	for p in "${ourpids[@]}"; do
		j=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || j=0
		S_OURS=$((S_OURS + ${j:-0}))
	done
	times >"$work/times" # children of this shell: loadgen, wrk, perf
	S_KIDS=$(awk 'NR == 2 { n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } printf "%d", n * 100 }' "$work/times")
	S_SYS=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $9 }' /proc/stat)
	S_WALL=${EPOCHREALTIME/./}
}
# others WALL SYS OURS KIDS: % of one CPU used by others since that snap.
others() {
	awk -v w=$((S_WALL - $1)) -v j=$((S_SYS - $2 - (S_OURS - $3) - (S_KIDS - $4))) \
		'BEGIN { v = j * 1e6 / w; if (v < 0) v = 0; printf "%.0f", v }'
}

# --- latency at a fixed rate -----------------------------------------------
declare -A lat_rps lat_p50 lat_p90 lat_p99 lat_p999 lat_err lat_lag lat_other
for n in "${names[@]}"; do
	best=
	for attempt in $(seq "$ATTEMPTS"); do
		echo "latency  $n: $RATE rps for ${LAT_SECONDS}s${best:+ (again: disturbed)}..."
		quiet "latency $n"
		snap
		s0=("$S_WALL" "$S_SYS" "$S_OURS" "$S_KIDS")
		f=$out/latency-$n.$attempt.txt
		on 0 env GOMAXPROCS=1 "$work/bin/loadgen" --url "${url[$n]}" --host echo \
			--header "x-cellmesh-uid: ${uidh[$n]}" --header 'x-echo-small: 1' \
			--rate "$RATE" --duration "${LAT_SECONDS}s" --warmup 2s --conns "$CONNS" \
			>"$f" 2>"$out/logs/loadgen-$n.log" || die "loadgen failed on $n: $(cat "$out/logs/loadgen-$n.log")"
		alive
		snap
		o=$(others "${s0[@]}")
		echo "    $(cat "$f") other=${o}%"
		if [ -z "$best" ] || [ "$o" -lt "${lat_other[$n]}" ]; then
			best=$attempt lat_other[$n]=$o
			cp "$f" "$out/latency-$n.txt"
		fi
		if [ "$o" -le "$MAX_OTHER" ]; then break; fi
	done
	f=$out/latency-$n.txt
	lat_rps[$n]=$(kv "$f" rps) lat_p50[$n]=$(kv "$f" p50_ms) lat_p90[$n]=$(kv "$f" p90_ms)
	lat_p99[$n]=$(kv "$f" p99_ms) lat_p999[$n]=$(kv "$f" p999_ms) lat_lag[$n]=$(kv "$f" lag_p99_ms)
	lat_err[$n]=$(($(kv "$f" errors) + $(kv "$f" missed)))
done

# --- memory at RSS_RATE ----------------------------------------------------
echo "memory: $RSS_RATE rps through (b) for 10s..."
quiet "memory"
nice -n "$NICE" taskset -c 0 env GOMAXPROCS=1 "$work/bin/loadgen" --url "${url[sidecar]}" --host echo \
	--header "x-cellmesh-uid: $UID_A" --header 'x-echo-small: 1' \
	--rate "$RSS_RATE" --duration 10s --warmup 0s --conns 64 >"$out/rss-load.txt" 2>"$out/logs/loadgen-rss.log" &
lg=$!
peak_rss=0
while kill -0 "$lg" 2>/dev/null; do
	alive
	kib=$(rss_kib "${pid[sidecar-a]}")
	if [ "$kib" -gt "$peak_rss" ]; then peak_rss=$kib; fi
	sleep 0.5
done
wait "$lg" || die "loadgen failed at $RSS_RATE rps: $(cat "$out/logs/loadgen-rss.log")"
{
	echo "sidecar-a idle_kib=${idle_rss[sidecar-a]} peak_at_${RSS_RATE}rps_kib=$peak_rss hwm_kib=$(hwm_kib "${pid[sidecar-a]}")"
	echo "sidecar-b idle_kib=${idle_rss[sidecar-b]} hwm_kib=$(hwm_kib "${pid[sidecar-b]}")"
	cat "$out/rss-load.txt"
} >"$out/rss.txt"
sed 's/^/    /' "$out/rss.txt"

# --- throughput at saturation ----------------------------------------------
# wrk_ms VALUE: wrk's "1.23ms" / "456.00us" / "1.01s" in milliseconds.
wrk_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /[0-9]s$/ && v !~ /ms$/) n *= 1000; printf "%.3f", n }'; }
declare -A tp_rps tp_p50 tp_p99 tp_err tp_cpu0 tp_cpu1 tp_us tp_other
for n in "${names[@]}"; do
	best=
	for attempt in $(seq "$ATTEMPTS"); do
		echo "throughput $n: wrk -t1 -c$WRK_CONNS -d${TPUT_SECONDS}s${best:+ (again: disturbed)}..."
		f=$out/throughput-$n.$attempt.txt
		quiet "throughput $n"
		perfpid=
		if [ "$PERF" = 1 ] && [[ $n == sidecar || $n == quic || $n == h2 ]]; then
			(sleep 2 && perf record -q -F 999 -g -C 1 -o "$out/perf-$n.data" -- sleep $((TPUT_SECONDS - 4)) >/dev/null 2>&1) &
			perfpid=$!
		fi
		snap
		s0=("$S_WALL" "$S_SYS" "$S_OURS" "$S_KIDS")
		read -r c0b c0t < <(cpustat 0)
		read -r c1b c1t < <(cpustat 1)
		on 0 wrk -t1 -c"$WRK_CONNS" -d"${TPUT_SECONDS}s" --latency \
			-H 'Host: echo' -H "x-cellmesh-uid: ${uidh[$n]}" "${small[@]}" "${url[$n]}" >"$f"
		read -r c0be c0te < <(cpustat 0)
		read -r c1be c1te < <(cpustat 1)
		if [ -n "$perfpid" ]; then wait "$perfpid" || true; fi
		alive
		snap
		o=$(others "${s0[@]}")
		rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$f")
		cpu0=$(( (c0be - c0b) * 100 / (c0te - c0t) ))
		cpu1=$(( (c1be - c1b) * 100 / (c1te - c1t) ))
		reqs=$(awk '/requests in/ { print $1 }' "$f")
		# CPU 1 time per request, in microseconds (jiffies are 1/100 s).
		us=$(awk -v j=$((c1be - c1b)) -v r="$reqs" 'BEGIN { printf "%.1f", (r > 0 ? j * 10000 / r : 0) }')
		echo "    $rps rps, CPU0 $cpu0%, CPU1 $cpu1%, CPU1 $us µs/req, other=${o}%"
		echo "cpu0_busy=$cpu0 cpu1_busy=$cpu1 cpu1_us_per_req=$us other=$o" >>"$f"
		if [ -z "$best" ] || [ "$o" -lt "${tp_other[$n]}" ]; then
			best=$attempt tp_other[$n]=$o
			cp "$f" "$out/throughput-$n.txt"
			tp_rps[$n]=$rps tp_cpu0[$n]=$cpu0 tp_cpu1[$n]=$cpu1 tp_us[$n]=$us
		fi
		if [ "$o" -le "$MAX_OTHER" ]; then break; fi
	done
	f=$out/throughput-$n.txt
	tp_p50[$n]=$(wrk_ms "$(awk '$1 == "50%" { print $2 }' "$f")")
	tp_p99[$n]=$(wrk_ms "$(awk '$1 == "99%" { print $2 }' "$f")")
	tp_err[$n]=$(awk '/Non-2xx/ { e += $NF } /Socket errors/ { gsub(/[^0-9 ]/, " "); split($0, a, " "); for (i in a) e += a[i] } END { print e + 0 }' "$f")
	if [ -f "$out/perf-$n.data" ]; then
		# Flat (self time) and inclusive (self and callees) views of CPU 1.
		perf report -i "$out/perf-$n.data" --stdio --no-children --sort comm,sym -g none --percent-limit 0.5 2>/dev/null |
			grep -v '^$' >"$out/perf-$n.txt" || true
		perf report -i "$out/perf-$n.data" --stdio --children --sort sym -g none --percent-limit 1 2>/dev/null |
			grep -v '^$' >"$out/perf-$n-inclusive.txt" || true
	fi
done

# --- summary ---------------------------------------------------------------
# r A B: A/B as "1.23x".
r() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2fx", a / b }'; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
met() { awk -v c="$1" 'BEGIN { print (c ? "**met**" : "**not met**") }'; }
{
	echo
	echo "### Latency at $RATE rps (open loop, $CONNS connections, ${LAT_SECONDS} s; ms from the scheduled send time)"
	echo
	echo "| path | rps | p50 | p90 | p99 | p99.9 | p50 vs (a) | p99 vs (a) | p99 added to (a) | p99 vs HAProxy | errors | other load |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
	for n in "${names[@]}"; do
		echo "| ${label[$n]} | ${lat_rps[$n]} | ${lat_p50[$n]} | ${lat_p90[$n]} | ${lat_p99[$n]} | ${lat_p999[$n]} |" \
			"$(r "${lat_p50[$n]}" "${lat_p50[direct]}") | $(r "${lat_p99[$n]}" "${lat_p99[direct]}") |" \
			"$(sub "${lat_p99[$n]}" "${lat_p99[direct]}") | $(r "${lat_p99[$n]}" "${lat_p99[haproxy]}") | ${lat_err[$n]} | ${lat_other[$n]}% |"
	done
	echo
	echo "### Throughput at saturation (wrk -t1 -c$WRK_CONNS -d${TPUT_SECONDS}s; wrk and echo on CPU 0, proxies on CPU 1)"
	echo
	echo "| path | rps | vs (a) | vs HAProxy | vs nginx | p50 ms | p99 ms | CPU 0 busy | CPU 1 busy | CPU 1 µs/req | errors | other load |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
	for n in "${names[@]}"; do
		echo "| ${label[$n]} | ${tp_rps[$n]} | $(r "${tp_rps[$n]}" "${tp_rps[direct]}") | $(r "${tp_rps[$n]}" "${tp_rps[haproxy]}") |" \
			"$(r "${tp_rps[$n]}" "${tp_rps[nginx]}") | ${tp_p50[$n]} | ${tp_p99[$n]} | ${tp_cpu0[$n]}% | ${tp_cpu1[$n]}% | ${tp_us[$n]} | ${tp_err[$n]} | ${tp_other[$n]}% |"
	done
	echo
	echo "### Sidecar memory (VmRSS)"
	echo
	echo "| sidecar | idle (after start, one request) | peak at $RSS_RATE rps through (b), 10 s | high-water mark, whole run |"
	echo "|---|---|---|---|"
	echo "| A (outbound; QUIC and TLS client) | $(mib "${idle_rss[sidecar-a]}") MiB | $(mib "$peak_rss") MiB | $(mib "$(hwm_kib "${pid[sidecar-a]}")") MiB |"
	echo "| B (QUIC and TLS server, to the app) | $(mib "${idle_rss[sidecar-b]}") MiB | - | $(mib "$(hwm_kib "${pid[sidecar-b]}")") MiB |"
	echo
	echo "Load at $RSS_RATE rps through (b): $(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(rps|p50_ms|p99_ms|errors|missed)=/) printf "%s ", $i }' "$out/rss-load.txt")"
	echo
	echo "### Targets"
	echo
	added_sc=$(awk -v a="${lat_p99[sidecar]}" -v b="${lat_p99[direct]}" 'BEGIN { print a - b }')
	added_hp=$(awk -v a="${lat_p99[haproxy]}" -v b="${lat_p99[direct]}" 'BEGIN { print a - b }')
	echo "- one sidecar hop adds no more p99 at $RATE rps than HAProxy: sidecar +$(sub "${lat_p99[sidecar]}" "${lat_p99[direct]}" | tr -d +) ms, HAProxy +$(sub "${lat_p99[haproxy]}" "${lat_p99[direct]}" | tr -d +) ms: $(met "$(awk -v a="$added_sc" -v b="$added_hp" 'BEGIN { print (a <= b) }')")"
	echo "- throughput through one sidecar >= 0.75x HAProxy and nginx: $(r "${tp_rps[sidecar]}" "${tp_rps[haproxy]}") of HAProxy, $(r "${tp_rps[sidecar]}" "${tp_rps[nginx]}") of nginx: $(met "$(awk -v s="${tp_rps[sidecar]}" -v h="${tp_rps[haproxy]}" -v n="${tp_rps[nginx]}" 'BEGIN { print (s >= .75 * h && s >= .75 * n) }')")"
	echo "- QUIC hop >= 0.8x the rps of the TCP+TLS hop: $(r "${tp_rps[quic]}" "${tp_rps[h2]}"): $(met "$(awk -v q="${tp_rps[quic]}" -v h="${tp_rps[h2]}" 'BEGIN { print (q >= .8 * h) }')"); p99 at $RATE rps <= 1.25x: $(r "${lat_p99[quic]}" "${lat_p99[h2]}"): $(met "$(awk -v q="${lat_p99[quic]}" -v h="${lat_p99[h2]}" 'BEGIN { print (q <= 1.25 * h) }')")"
	echo "  (CPU 1 per request, whatever held each path back: sidecar ${tp_us[sidecar]} µs, HAProxy ${tp_us[haproxy]} µs, nginx ${tp_us[nginx]} µs: the sidecar costs $(r "${tp_us[sidecar]}" "${tp_us[haproxy]}") HAProxy's CPU per request.)"
	for n in haproxy nginx; do
		if [ "${tp_cpu1[$n]}" -lt 95 ]; then
			echo "  ($n kept CPU 1 only ${tp_cpu1[$n]}% busy: it was held back by CPU 0 (wrk and the echo), so its rps is a lower bound and the ratios above flatter the sidecar.)"
		fi
	done
	echo "- idle RSS <= 30 MiB: A $(mib "${idle_rss[sidecar-a]}") MiB, B $(mib "${idle_rss[sidecar-b]}") MiB: $(met "$(awk -v a="${idle_rss[sidecar-a]}" -v b="${idle_rss[sidecar-b]}" 'BEGIN { print (a <= 30720 && b <= 30720) }')")"
	echo
	echo "Generator lag p99 (how late loadgen itself wrote, ms): $(for n in "${names[@]}"; do printf '%s %s; ' "$n" "${lat_lag[$n]}"; done)"
	if [ -f "$out/notes.txt" ]; then echo "Runs that started on a busy machine: $(paste -sd';' "$out/notes.txt")"; fi
	echo "Total run time: ${SECONDS}s. Raw outputs: bench/out/sidecar/."
} | tee "$out/summary.md"
cat "$out/machine.txt" >>"$out/summary.md"
