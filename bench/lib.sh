# Functions shared by the benchmark scripts (sourced, not run): freeport
# and quiet. quiet writes to $out/notes.txt and reads QUIET_WAIT and
# QUIET_BUDGET.

# freeport VAR: a port free for TCP and UDP on 127.0.0.1, below the
# ephemeral range and not handed out before in this run.
taken=" "
freeport() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		case $taken in *" $p "*) continue ;; esac
		ss -Htuan "( sport = :$p )" 2>/dev/null | grep -q . && continue
		taken+="$p "
		printf -v "$1" %s "$p"
		return
	done
}

# quiet NAME: wait (up to QUIET_WAIT s, QUIET_BUDGET for all the waits of
# a run) until the machine is idle (under 10% busy over half a second)
# before a measurement; a run that starts on a busy machine is noted in
# $out/notes.txt.
QUIET_WAIT=${QUIET_WAIT:-30}
QUIET_BUDGET=${QUIET_BUDGET:-60}
waited=0
quiet() {
	local wait=$((QUIET_WAIT < QUIET_BUDGET - waited ? QUIET_WAIT : QUIET_BUDGET - waited))
	local begin=$SECONDS deadline=$((SECONDS + wait)) a0 t0 a1 t1 busy
	while :; do
		read -r a0 t0 < <(awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
		sleep 0.5
		read -r a1 t1 < <(awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
		busy=$(((a1 - a0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
		if [ "$busy" -lt 10 ]; then
			waited=$((waited + SECONDS - begin))
			return 0
		fi
		if [ $SECONDS -ge $deadline ]; then
			waited=$((waited + SECONDS - begin))
			echo "    (the machine is ${busy}% busy before this run; going on)"
			echo "$1: machine ${busy}% busy at the start" >>"$out/notes.txt"
			return 0
		fi
		sleep 1
	done
}
