#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (this host is the controller and the only compute node), for
# running and testing the multi-node sweep recipe of docs/sweeps.md with hydra/launcher=submitit_slurm.
#
#   bash scripts/local_slurm.sh --install   # apt-get install slurm-wlm munge, then as below
#   bash scripts/local_slurm.sh             # write the config, start munged, slurmctld, slurmd; wait for idle
#   bash scripts/local_slurm.sh --status    # sinfo and squeue
#   bash scripts/local_slurm.sh --stop      # stop the three daemons (the config and state stay)
#
# Safe to run again: a running daemon is left as it is. Needs root (it starts the daemons directly: there
# is no systemd in a container). Debian's packages are used as they are; everything this script writes is
# /etc/slurm/slurm.conf (marked as ours; a slurm.conf that is not ours is never touched) and the folder
# $BLOODCELL_SLURM_DIR (default /var/lib/bloodcell-slurm: state, spool, logs, pid files).
#
# Two partitions share the node, so that preemption can be tried for real: `debug` (the default,
# PriorityTier=1, PreemptMode=REQUEUE) and `urgent` (PriorityTier=2). A job submitted to `urgent` that
# needs the node's CPUs preempts `debug` jobs: SLURM sends them their --signal (submitit's USR2: checkpoint
# and requeue; SlurmctldParameters=preempt_send_user_signal) and requeues them after GraceTime.
set -euo pipefail

STATE_DIR=${BLOODCELL_SLURM_DIR:-/var/lib/bloodcell-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by bloodcell scripts/local_slurm.sh"

die() {
	echo "local_slurm: $*" >&2
	exit 1
}
say() { echo "local_slurm: $*"; }

install_packages() {
	# nothing to do (not even apt-get update, 5-10 s) when the packages are there already
	local installed
	installed=$(dpkg-query -W -f='${Status}\n' slurm-wlm munge 2>/dev/null | grep -c 'install ok installed' || true)
	((installed == 2)) && return 0
	export DEBIAN_FRONTEND=noninteractive
	# apt's lists may be missing on a fresh machine
	apt-get update -qq
	apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

alive() { # pid file -> is that process running?
	[[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_config() {
	if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
		die "$CONF exists and was not written by this script; not touching a real cluster's config"
	fi
	local host cpus mem
	host=$(hostname -s)
	cpus=$(nproc)
	# slurmd drains a node whose configured memory exceeds what it finds; leave a margin
	mem=$(($(free -m | awk '/^Mem:/ {print $2}') * 9 / 10))
	mkdir -p "$STATE_DIR"/{ctld,spool,log} /etc/slurm
	local tmp
	tmp=$(mktemp "$CONF.XXXXXX")
	cat >"$tmp" <<EOF
$MARKER; rewritten on every start
ClusterName=bloodcell
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire + 1 s before it may start again (default 120)
AuthInfo=cred_expire=30
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# no cgroups in a container: track a job's processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# CPUs are the consumable; memory is not tracked (a job without --mem would otherwise take all of it)
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# a requeued job may run again; a job that ignores SIGTERM is killed 10 s later (default 30)
JobRequeue=1
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# no mail on a test cluster (the default /bin/mail is not installed)
MailProg=/bin/true
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
	chmod 644 "$tmp"
	if [[ -e $CONF ]] && cmp -s "$tmp" "$CONF"; then
		rm -f "$tmp"
	else
		mv "$tmp" "$CONF"
		CONFIG_CHANGED=1
	fi
}

start_munge() {
	local pidfile=/run/munge/munged.pid
	if alive "$pidfile"; then
		return
	fi
	install -d -o munge -g munge -m 0755 /run/munge
	install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
	if [[ ! -s /etc/munge/munge.key ]]; then
		# the Debian package makes one on install; a machine set up some other way may lack it
		mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge/munge.key
		chmod 0400 /etc/munge/munge.key
	fi
	runuser -u munge -- /usr/sbin/munged --pid-file="$pidfile"
	say "munged started"
}

start_slurm() {
	local ctld_pid=$STATE_DIR/slurmctld.pid slurmd_pid=$STATE_DIR/slurmd.pid
	if alive "$ctld_pid" && [[ ${CONFIG_CHANGED:-0} == 1 ]]; then
		scontrol reconfigure >/dev/null || true
	fi
	if ! alive "$ctld_pid"; then
		/usr/sbin/slurmctld
		say "slurmctld started"
	fi
	if ! alive "$slurmd_pid"; then
		/usr/sbin/slurmd
		say "slurmd started"
	fi
}

wait_idle() {
	local host state
	host=$(hostname -s)
	for _ in $(seq 1 60); do
		state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null | head -1 || true)
		case $state in
		idle | mixed | allocated | completing)
			say "node $host is $state ($(nproc) CPUs); partitions: $(sinfo -h -o %P | tr '\n' ' ')"
			return
			;;
		down* | drain*)
			# a restart leaves the node down ("Node unexpectedly rebooted", a changed config); it is ours
			scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
			;;
		esac
		sleep 1
	done
	sinfo -N -l >&2 || true
	tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
	die "node $host did not become idle within 60 s (logs in $STATE_DIR/log)"
}

stop_all() {
	local pidfile
	for pidfile in "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid" /run/munge/munged.pid; do
		if alive "$pidfile"; then
			kill "$(cat "$pidfile")"
			for _ in $(seq 1 20); do
				alive "$pidfile" || break
				sleep 0.5
			done
			say "stopped $(basename "$pidfile" .pid)"
		fi
	done
}

main() {
	local install=0 action=start
	for arg in "$@"; do
		case $arg in
		--install) install=1 ;;
		--stop) action=stop ;;
		--status) action=status ;;
		-h | --help)
			sed -n '2,18p' "$0"
			return
			;;
		*) die "unknown option $arg (--install, --stop, --status)" ;;
		esac
	done
	[[ $(id -u) == 0 ]] || die "run as root (it starts munged, slurmctld and slurmd)"
	case $action in
	stop)
		stop_all
		return
		;;
	status)
		sinfo && squeue
		return
		;;
	esac
	if ((install)); then
		install_packages
	fi
	if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
		die "slurm-wlm and munge are not installed: run with --install (apt-get install slurm-wlm munge)"
	fi
	write_config
	start_munge
	start_slurm
	wait_idle
}

main "$@"
