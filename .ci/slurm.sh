#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests of the submitit launcher.
#
#   eval "$(bash .ci/slurm.sh start)"   # installs, configures, starts; prints `export SLURM_CONF=...`
#   sinfo; sbatch --wrap 'sleep 1'; python -m vanishlab.train -m hydra/launcher=slurm ...
#   bash .ci/slurm.sh stop              # stops exactly the daemons that `start` started
#
# Everything (configs, munge key and socket, MariaDB data, spool, state, logs, pid files) lives
# in $SLURM_STATE_DIR (default /tmp/vanishlab-slurm); nothing is written to /etc. SLURM's
# commands find the config through SLURM_CONF, which `start` prints on stdout (its progress goes
# to stderr). The node is `localhost` (127.0.0.1, 2 CPUs) in partition `debug`.
#
# Accounting (slurmdbd backed by a private MariaDB) is on by default: without it `sacct` only
# says "Slurm accounting storage is disabled", and submitit then never learns that a job which
# died without writing its result (scancel, node failure, time limit, OOM) has ended: job.done()
# stays False and job.result() (so the hydra submitit launcher) waits forever.
# SLURM_ACCOUNTING=0 skips slurmdbd and MariaDB (faster, but only for jobs that end by themselves).
#
# Other knobs: SLURM_CTLD_PORT (6817), SLURM_SLURMD_PORT (6818), SLURM_DBD_PORT (6819),
# SLURM_MYSQL_PORT (3307; MariaDB listens on 127.0.0.1 only).
set -euo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/vanishlab-slurm}"
ACCOUNTING="${SLURM_ACCOUNTING:-1}"
CTLD_PORT="${SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${SLURM_DBD_PORT:-6819}"
MYSQL_PORT="${SLURM_MYSQL_PORT:-3307}"
CLUSTER=vanishlab

CONF="$STATE/slurm.conf"
DBD_CONF="$STATE/slurmdbd.conf" # slurmdbd looks for it beside $SLURM_CONF
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
MYSQL_DIR="$STATE/mysql"
MYSQL_SOCKET="$MYSQL_DIR/mysqld.sock"
RUN="$STATE/run"
LOG="$STATE/log"
export SLURM_CONF="$CONF"

say() { echo "slurm.sh: $*" >&2; }
die() {
	say "ERROR: $*"
	exit 1
}

# is this pid a running process (not gone, not a zombie waiting for init to reap it)?
running() {
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $st && $st != Z && $st != X ]]
}

# pidfile -> pid on stdout, if that process is running
alive_pid() {
	local f=$1 pid
	[[ -s $f ]] || return 1
	pid=$(tr -dc '0-9' <"$f")
	[[ -n $pid ]] && running "$pid" && echo "$pid"
}

# name pidfile: true, and says so, if that daemon is running already
already_running() {
	local pid
	pid=$(alive_pid "$2") || return 1
	say "$1 already running (pid $pid)"
}

wait_for() { # seconds command... : retry every 0.2 s until the command succeeds or time is up
	local deadline=$((SECONDS + $1))
	shift
	while ((SECONDS < deadline)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	return 1
}

install_packages() {
	local want=(slurm-wlm slurmctld slurmd slurm-client munge) missing=() p t0=$SECONDS
	[[ $ACCOUNTING == 1 ]] && want+=(slurmdbd mariadb-server)
	for p in "${want[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	say "installing ${missing[*]} (apt-get)"
	# Debian's postinst scripts try to start the services; policy-rc.d (where present) stops that,
	# and without a config they would not start anyway. Ours run from $STATE.
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}" >&2; then
		apt-get update -q >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}" >&2
	fi
	say "packages installed in $((SECONDS - t0)) s"
}

write_config() {
	mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
	chmod 0755 "$STATE"
	local mem acct
	# RealMemory (MB) so that --mem requests (the launcher's mem_gb) can be satisfied.
	mem=$(awk '/^MemTotal:/ {print int($2 / 1024) - 512}' /proc/meminfo)
	if [[ $ACCOUNTING == 1 ]]; then
		acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the munge socket for connections to slurmdbd (slurmctld, sacct, sacctmgr): AuthInfo is not used there
AccountingStoragePass=$MUNGE_SOCKET"
	else
		acct="AccountingStorageType=accounting_storage/none"
	fi
	cat >"$CONF.tmp" <<EOF
# Written by .ci/slurm.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job is held (120 s by default; slurm.conf(5)): the requeue test waits it out
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
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
# a backfill pass every second (30 s by default): it starts a requeued job soon after its hold
# (cred_expire) ends; measured: requeue to restart 14 s, where it was 29 s
SchedulerParameters=bf_interval=1
MpiDefault=none
ReturnToService=2
$acct
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
# reject at sbatch time ("More processors requested than permitted") what could never run here,
# instead of leaving it pending forever (Reason=PartitionConfig), e.g. the launcher's default
# cpus_per_task=4 on this 2-CPU node
EnforcePartLimits=ALL
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
	if [[ -f $CONF ]] && alive_pid "$RUN/slurmctld.pid" >/dev/null; then
		# the running daemons read the config at start: keep theirs
		cmp -s "$CONF.tmp" "$CONF" || say "slurmctld is running with an older $CONF: kept; stop and start to apply the new one"
		rm -f "$CONF.tmp"
	else
		mv "$CONF.tmp" "$CONF"
	fi
}

start_munged() {
	already_running munged "$MUNGE_DIR/munged.pid" && return 0
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
	wait_for 20 bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'" ||
		die "munged does not answer on $MUNGE_SOCKET; see $MUNGE_DIR/munged.log"
}

mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root "$@"; }

start_mariadb() {
	already_running mariadbd "$MYSQL_DIR/mariadbd.pid" && return 0
	mkdir -p "$MYSQL_DIR"
	chown mysql:mysql "$MYSQL_DIR"
	if [[ ! -d $MYSQL_DIR/data/mysql ]]; then
		say "initialising MariaDB in $MYSQL_DIR/data"
		mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
			--auth-root-authentication-method=socket --skip-test-db \
			>"$LOG/mariadb-install-db.log" 2>&1 ||
			die "mariadb-install-db failed; see $LOG/mariadb-install-db.log"
	fi
	say "starting mariadbd (127.0.0.1:$MYSQL_PORT)"
	# mariadbd stays in the foreground: detach it; it writes its own pid file.
	setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
		--socket="$MYSQL_SOCKET" --pid-file="$MYSQL_DIR/mariadbd.pid" \
		--bind-address=127.0.0.1 --port="$MYSQL_PORT" --log-error="$MYSQL_DIR/mariadbd.err" \
		--innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
		--innodb-flush-log-at-trx-commit=2 --skip-log-bin \
		</dev/null >>"$LOG/mariadbd.out" 2>&1 &
	wait_for 60 mysql_root -e 'SELECT 1' ||
		die "MariaDB does not answer on $MYSQL_SOCKET; see $MYSQL_DIR/mariadbd.err"
	wait_for 10 alive_pid "$MYSQL_DIR/mariadbd.pid" || die "no pid file from mariadbd"
}

start_slurmdbd() {
	local pass
	already_running slurmdbd "$RUN/slurmdbd.pid" && return 0
	if [[ ! -s $MYSQL_DIR/slurm.pass ]]; then
		(umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$MYSQL_DIR/slurm.pass")
	fi
	pass=$(cat "$MYSQL_DIR/slurm.pass")
	mysql_root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
		ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
		CREATE DATABASE IF NOT EXISTS slurm_acct_db;
		GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
		die "could not create the slurm database user"
	(
		umask 077
		cat >"$DBD_CONF" <<EOF
# Written by .ci/slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
	)
	say "starting slurmdbd"
	slurmdbd >>"$LOG/slurmdbd.out" 2>&1 ||
		die "slurmdbd did not start; see $LOG/slurmdbd.log and $LOG/slurmdbd.out"
	wait_for 60 sacctmgr -n list cluster ||
		die "slurmdbd does not answer; see $LOG/slurmdbd.log"
	if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
		sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr could not add cluster $CLUSTER"
	fi
}

start_slurmctld() {
	already_running slurmctld "$RUN/slurmctld.pid" && return 0
	say "starting slurmctld"
	# State (job ids, queue) is kept in $STATE/slurmctld across stop/start, so job ids keep
	# rising and never collide with the ones the accounting database already holds.
	slurmctld -f "$CONF" >>"$LOG/slurmctld.out" 2>&1 ||
		die "slurmctld did not start; see $LOG/slurmctld.log and $LOG/slurmctld.out"
	wait_for 30 scontrol ping || die "slurmctld does not answer; see $LOG/slurmctld.log"
}

start_slurmd() {
	already_running slurmd "$RUN/slurmd.pid" && return 0
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
	if [[ $ACCOUNTING == 1 ]]; then
		start_mariadb
		start_slurmdbd
	fi
	start_slurmctld
	start_slurmd
	wait_for 60 node_idle || {
		sinfo -N -l >&2 || true
		die "node localhost is not idle after 60 s; see $LOG/"
	}
	say "cluster up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %t %c' | tr '\n' ' ')"
	say "run SLURM commands with: export SLURM_CONF=$CONF"
	echo "export SLURM_CONF=$CONF"
}

# kill one recorded pid (TERM, then KILL after 20 s) if it is still the named program
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
	for ((i = 0; i < 100; i++)); do
		running "$pid" || break
		sleep 0.2
	done
	if running "$pid"; then
		say "$name (pid $pid) ignored TERM for 20 s: KILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

cmd_stop() {
	local jobs
	if [[ -f $CONF ]] && alive_pid "$RUN/slurmctld.pid" >/dev/null; then
		# End the jobs still on the cluster through SLURM itself, so no job outlives slurmd.
		jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
		if [[ -n ${jobs// /} ]]; then
			say "cancelling jobs: $jobs"
			# shellcheck disable=SC2086
			scancel $jobs 2>/dev/null || true
			# shellcheck disable=SC2016 # expanded by the inner bash
			wait_for 15 bash -c '[[ -z $(squeue -h -o %i) ]]' || true
		fi
	fi
	stop_pid slurmd "$RUN/slurmd.pid"
	stop_pid slurmctld "$RUN/slurmctld.pid"
	stop_pid slurmdbd "$RUN/slurmdbd.pid"
	stop_pid mariadbd "$MYSQL_DIR/mariadbd.pid"
	stop_pid munged "$MUNGE_DIR/munged.pid"
	say "stopped (state kept in $STATE; remove that directory for a fresh cluster)"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
*)
	echo "usage: $0 start|stop   (state in \$SLURM_STATE_DIR, default /tmp/vanishlab-slurm)" >&2
	exit 2
	;;
esac
