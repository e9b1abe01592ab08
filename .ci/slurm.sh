#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests of the submitit launcher.
#
#   eval "$(bash .ci/slurm.sh start)"   # installs, configures and starts it; prints `export SLURM_CONF=...`
#   ... sbatch / sinfo / python -m vanishlab.train -m hydra/launcher=slurm ...
#   bash .ci/slurm.sh stop              # stops exactly the daemons that `start` started
#
# Everything (config, munge key and socket, spool, state, logs, pid files) lives in
# $SLURM_STATE_DIR (default /tmp/vanishlab-slurm); nothing is written to /etc. SLURM's
# commands find the config through SLURM_CONF, which `start` prints on stdout (its progress
# goes to stderr). The node is `localhost` (127.0.0.1, 2 CPUs) in partition `debug`.
set -euo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/vanishlab-slurm}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
RUN="$STATE/run"
LOG="$STATE/log"
CTLD_PORT="${SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_SLURMD_PORT:-6818}"
export SLURM_CONF="$CONF"

say() { echo "slurm.sh: $*" >&2; }
die() {
	say "ERROR: $*"
	exit 1
}

# pidfile -> pid, if that process is alive
alive_pid() {
	local f=$1 pid
	[[ -s $f ]] || return 1
	pid=$(tr -dc '0-9' <"$f")
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for() { # seconds description command...
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 5; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	return 1
}

install_packages() {
	local missing=() p
	for p in slurmctld slurmd slurm-client munge; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	say "installing ${missing[*]} (apt-get)"
	local t0=$SECONDS
	# Debian's postinst scripts would try to start the services; policy-rc.d (if present) stops that,
	# and they have no config to start with anyway.
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		slurm-wlm slurmctld slurmd slurm-client munge >&2 ||
		{
			apt-get update -q >&2
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				slurm-wlm slurmctld slurmd slurm-client munge >&2
		}
	say "packages installed in $((SECONDS - t0)) s"
}

write_config() {
	mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
	chmod 0755 "$STATE"
	local mem
	# RealMemory (MB) so that --mem requests (the launcher's mem_gb) can be satisfied.
	mem=$(awk '/^MemTotal:/ {print int($2 / 1024) - 512}' /proc/meminfo)
	cat >"$CONF.tmp" <<EOF
# Written by .ci/slurm.sh: a one-node test cluster.
ClusterName=vanishlab
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
	mv "$CONF.tmp" "$CONF"
}

start_munged() {
	if alive_pid "$MUNGE_DIR/munged.pid" >/dev/null; then
		say "munged already running (pid $(alive_pid "$MUNGE_DIR/munged.pid"))"
		return 0
	fi
	mkdir -p "$MUNGE_DIR"
	chown munge:munge "$MUNGE_DIR"
	chmod 0755 "$MUNGE_DIR" # the socket must be reachable by every user; the key itself is 0400
	if [[ ! -s $MUNGE_DIR/munge.key ]]; then
		if command -v mungekey >/dev/null; then
			mungekey --create --keyfile="$MUNGE_DIR/munge.key"
		else
			dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
		fi
	fi
	chown munge:munge "$MUNGE_DIR/munge.key"
	chmod 0400 "$MUNGE_DIR/munge.key"
	rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
	say "starting munged"
	runuser -u munge -- /usr/sbin/munged \
		--key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
		--pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
		--seed-file="$MUNGE_DIR/munged.seed" >&2 ||
		die "munged did not start; see $MUNGE_DIR/munged.log"
	wait_for 20 munged bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'" ||
		die "munged does not answer on $MUNGE_SOCKET; see $MUNGE_DIR/munged.log"
}

start_slurmctld() {
	if alive_pid "$RUN/slurmctld.pid" >/dev/null; then
		say "slurmctld already running (pid $(alive_pid "$RUN/slurmctld.pid"))"
		return 0
	fi
	say "starting slurmctld"
	# -c: a clean cluster on every start (no jobs or node states carried over from a previous run)
	slurmctld -c -f "$CONF" >>"$LOG/slurmctld.out" 2>&1 ||
		die "slurmctld did not start; see $LOG/slurmctld.log and $LOG/slurmctld.out"
	wait_for 30 slurmctld scontrol ping ||
		die "slurmctld does not answer; see $LOG/slurmctld.log"
}

start_slurmd() {
	if alive_pid "$RUN/slurmd.pid" >/dev/null; then
		say "slurmd already running (pid $(alive_pid "$RUN/slurmd.pid"))"
		return 0
	fi
	say "starting slurmd"
	slurmd -N localhost -f "$CONF" >>"$LOG/slurmd.out" 2>&1 ||
		die "slurmd did not start; see $LOG/slurmd.log and $LOG/slurmd.out"
}

node_idle() {
	local s
	s=$(sinfo -h -n localhost -o %t 2>/dev/null) || return 1
	[[ $s == idle || $s == mix || $s == alloc ]]
}

cmd_start() {
	local t0=$SECONDS
	install_packages
	write_config
	start_munged
	start_slurmctld
	start_slurmd
	wait_for 60 "node idle" node_idle || {
		sinfo -N -l >&2 || true
		die "node localhost is not idle after 60 s; see $LOG/"
	}
	say "cluster up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %t %c' | tr '\n' ' ')"
	say "run SLURM commands with: export SLURM_CONF=$CONF"
	echo "export SLURM_CONF=$CONF"
}

# kill one recorded pid (TERM, then KILL after a while) if it is still the named program
stop_pid() {
	local name=$1 f=$2 pid comm i
	pid=$(alive_pid "$f") || {
		rm -f "$f"
		return 0
	}
	comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
	if [[ $comm != "$name"* ]]; then
		say "pid $pid in $f is '$comm', not $name: left alone"
		rm -f "$f"
		return 0
	fi
	say "stopping $name (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.2
	done
	if kill -0 "$pid" 2>/dev/null; then
		say "$name (pid $pid) ignored TERM for 10 s: KILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

cmd_stop() {
	if [[ -f $CONF ]] && alive_pid "$RUN/slurmctld.pid" >/dev/null; then
		# End the jobs still on the cluster through SLURM itself, so no job step outlives slurmd.
		local jobs
		jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
		if [[ -n ${jobs// /} ]]; then
			say "cancelling jobs: $jobs"
			# shellcheck disable=SC2086
			scancel $jobs 2>/dev/null || true
			wait_for 15 "jobs gone" bash -c '[[ -z $(squeue -h -t R,CG,PD -o %i) ]]' || true
		fi
	fi
	stop_pid slurmd "$RUN/slurmd.pid"
	stop_pid slurmctld "$RUN/slurmctld.pid"
	stop_pid munged "$MUNGE_DIR/munged.pid"
	say "stopped (state kept in $STATE)"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
*)
	echo "usage: $0 start|stop   (state in \$SLURM_STATE_DIR, default /tmp/vanishlab-slurm)" >&2
	exit 2
	;;
esac
