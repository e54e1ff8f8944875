#!/usr/bin/env bash
# A PostgreSQL database on this machine for the multi-node sweep tests (a shared Optuna study), from
# Debian's postgresql package.
#
#   bash scripts/local_postgres.sh --install   # apt-get install postgresql, then as below
#   bash scripts/local_postgres.sh             # start the cluster, create user and database; print the URL
#   bash scripts/local_postgres.sh --stop      # stop the cluster
#
# Safe to run again: a running cluster is left running, an existing user or database is kept. Needs root
# (it starts the cluster with pg_ctlcluster directly: there is no systemd in a container). The last line
# on stdout is the export to use, e.g.
#   export BLOODCELL_TEST_POSTGRES=postgresql://bloodcell:bloodcell@localhost:5432/optuna
# A test user with a password in the URL is fine for a throwaway local database; on a real cluster keep
# the password in ~/.pgpass (docs/sweeps.md).
set -euo pipefail

DB_USER=${BLOODCELL_PG_USER:-bloodcell}
DB_PASSWORD=${BLOODCELL_PG_PASSWORD:-bloodcell}
DB_NAME=${BLOODCELL_PG_DB:-optuna}

die() {
	echo "local_postgres: $*" >&2
	exit 1
}
say() { echo "local_postgres: $*" >&2; }

install_packages() {
	# nothing to do (not even apt-get update, 5-10 s) when the packages are there already
	local installed
	installed=$(dpkg-query -W -f='${Status}\n' postgresql 2>/dev/null | grep -c 'install ok installed' || true)
	((installed == 1)) && return 0
	export DEBIAN_FRONTEND=noninteractive
	# apt's lists may be missing on a fresh machine
	apt-get update -qq
	apt-get install -y -q --no-install-recommends postgresql >/dev/null
}

# version and port of the cluster named main (the one Debian's package creates), made if missing
cluster() {
	local line
	line=$(pg_lsclusters -h | awk '$2 == "main" {print $1, $3; exit}')
	if [[ -z $line ]]; then
		local version
		version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1)
		[[ -n $version ]] || die "no PostgreSQL server under /usr/lib/postgresql: run with --install"
		pg_createcluster "$version" main >/dev/null
		line=$(pg_lsclusters -h | awk '$2 == "main" {print $1, $3; exit}')
	fi
	echo "$line"
}

psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtAX "$@"; }

main() {
	local install=0 action=start
	for arg in "$@"; do
		case $arg in
		--install) install=1 ;;
		--stop) action=stop ;;
		-h | --help)
			sed -n '2,14p' "$0"
			return
			;;
		*) die "unknown option $arg (--install, --stop)" ;;
		esac
	done
	[[ $(id -u) == 0 ]] || die "run as root (it starts the PostgreSQL cluster)"
	if ((install)); then
		install_packages
	fi
	command -v pg_lsclusters >/dev/null || die "postgresql is not installed: run with --install"
	local version port
	read -r version port < <(cluster)
	if [[ $action == stop ]]; then
		pg_ctlcluster "$version" main stop 2>/dev/null || true
		say "stopped PostgreSQL $version/main"
		return
	fi
	if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
		pg_ctlcluster "$version" main start >&2  # it may say "Removed stale pid file" on stdout
		say "started PostgreSQL $version/main on port $port"
	fi
	for _ in $(seq 1 30); do
		pg_isready -q -h localhost -p "$port" && break
		sleep 0.5
	done
	pg_isready -q -h localhost -p "$port" || die "PostgreSQL $version/main does not answer on port $port"
	if [[ $(psql_admin -p "$port" -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") != 1 ]]; then
		psql_admin -p "$port" -c "CREATE ROLE \"$DB_USER\" LOGIN PASSWORD '$DB_PASSWORD'"
	fi
	if [[ $(psql_admin -p "$port" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") != 1 ]]; then
		psql_admin -p "$port" -c "CREATE DATABASE \"$DB_NAME\" OWNER \"$DB_USER\""
	fi
	say "database $DB_NAME, user $DB_USER ready"
	echo "export BLOODCELL_TEST_POSTGRES=postgresql://$DB_USER:$DB_PASSWORD@localhost:$port/$DB_NAME"
}

main "$@"
