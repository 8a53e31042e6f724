#!/usr/bin/env bash
# Dress rehearsal of `snakemake --profile profiles/slurm` on a real one-node SLURM on this machine.
#
#   scripts/slurm-rehearsal.sh [CONFIGFILE [TARGET...]]      (as root; default config/paper-rehearsal.yaml)
#
# Starts munged, MariaDB, slurmdbd, slurmctld and slurmd (installing Debian's slurm-wlm, munge,
# slurmdbd and mariadb-server if missing), runs the DAG once locally (profiles/local) and once through
# snakemake-executor-plugin-slurm (real sbatch, real sacct status checks), checks that every job ran
# with the account, partition and GPU type given through the EPMQ_SLURM_* variables and that the
# tables equal the local run's (scripts/slurm_rehearsal_check.py), and stops every daemon it started.
#
# The node pretends to be a GPU node: 16 CPUs, 256 GB and two GPUs of type `rehearsal` (gres files
# /dev/null) under SlurmdParameters=config_overrides, so the profile's real requests (8 CPUs, 64 GB,
# --gpus=rehearsal:1) are granted as written; the jobs then share this machine's cores.
# It writes /etc/slurm/{slurm,gres,slurmdbd}.conf (refusing to replace existing ones) and removes
# them at the end. Work files go to EPMQ_REHEARSAL_DIR (default: a new /tmp/epmq-slurm-rehearsal.XXXXXX);
# kept, and when reused its local run and hub fixtures are kept too; with EPMQ_REHEARSAL_RESUME=1 the
# SLURM run's outputs are kept as well, so an interrupted SLURM run resumes where it stopped (the
# checks then cover the jobs of the resumed run, the tables and the rerun all). A config with hub suites
# (builder hub-*) runs offline on fixtures from scripts/make_hub_fixtures.py (HF_HOME=$WORK/hf).
# Exit codes: 0 rehearsal passed, 1 it failed, 2 bad usage, 77 SLURM cannot run here (not root, no
# packages).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONFIG=${1:-config/paper-rehearsal.yaml}
shift || true
TARGETS=("$@")
[[ $CONFIG = /* ]] || CONFIG=$ROOT/$CONFIG
if [[ ! -f $CONFIG ]]; then
    echo "slurm-rehearsal: no config file $CONFIG" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-rehearsal: needs root (it starts munged, MariaDB and the SLURM daemons)" >&2
    exit 77
fi

PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
missing=0
for program in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
    command -v "$program" >/dev/null || missing=1
done
if ((missing)); then
    echo "slurm-rehearsal: installing ${PACKAGES[*]}" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"; } >&2; then
        echo "slurm-rehearsal: cannot install ${PACKAGES[*]}" >&2
        exit 77
    fi
fi
for port in 6817 6818 6819; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "slurm-rehearsal: port $port is taken (another SLURM running?)" >&2
        exit 77
    fi
done

WORK=${EPMQ_REHEARSAL_DIR:-$(mktemp -d /tmp/epmq-slurm-rehearsal.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
S=$WORK/slurm
# a reused directory keeps its local run (a rerun of it does nothing) and, when resuming, its SLURM
# run; all else starts afresh
rm -rf "$S" "$WORK/mysql"
[[ ${EPMQ_REHEARSAL_RESUME:-0} = 1 ]] || rm -rf "$WORK/cluster"
mkdir -p "$S/state" "$S/spool" "$WORK/mysql"
HOST=$(hostname -s)
GPU_MODEL=rehearsal
DB_PORT=3307
DB_PASS=rehearsal-$$
# slurm.conf must sit where srun looks without SLURM_CONF: the jobstep plugin drops SLURM_* variables
# from the environment of the srun inside each job. An existing SLURM configuration is left alone.
ETC=/etc/slurm
for conf in slurm.conf gres.conf slurmdbd.conf; do
    if [[ -e $ETC/$conf ]]; then
        echo "slurm-rehearsal: $ETC/$conf exists (a SLURM installed here?); not overwriting it" >&2
        exit 77
    fi
done

STARTED=()  # "name pidfile", in start order
WRITTEN=()  # configuration files written outside $WORK
stop_all() {
    local status=$?
    set +e
    if ((${#STARTED[@]})); then
        command -v scancel >/dev/null && scancel --user "$(id -un)" 2>/dev/null
        for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
            read -r name pidfile <<<"${STARTED[i]}"
            pid=$(cat "$pidfile" 2>/dev/null)
            [[ -n $pid ]] || continue
            kill "$pid" 2>/dev/null
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "slurm-rehearsal: $name ($pid) ignores SIGTERM; killing it" >&2
                kill -9 "$pid" 2>/dev/null
            fi
        done
        echo "slurm-rehearsal: stopped ${#STARTED[@]} daemons" >&2
    fi
    ((${#WRITTEN[@]})) && rm -f "${WRITTEN[@]}"
    exit "$status"
}
trap stop_all EXIT
trap 'exit 1' INT TERM

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "slurm-rehearsal: $what did not come up within ${seconds}s (logs in $S)" >&2
    return 1
}

# --- munge (reused if one already answers) -------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged  # as root it refuses its log directory
    STARTED+=("munged /run/munge/munged.pid")
    wait_for 10 munged sh -c 'munge -n | unmunge'
fi

# --- MariaDB for slurmdbd, in its own data directory and port -----------------------------------
mariadb-install-db --no-defaults --datadir="$WORK/mysql" --user=root --auth-root-authentication-method=socket \
    >"$WORK/mariadb-install.log" 2>&1
mariadbd --no-defaults --user=root --datadir="$WORK/mysql" --socket="$WORK/mysqld.sock" \
    --pid-file="$WORK/mysqld.pid" --bind-address=127.0.0.1 --port=$DB_PORT \
    --log-error="$WORK/mysqld.log" </dev/null >/dev/null 2>&1 &
STARTED+=("mariadbd $WORK/mysqld.pid")
wait_for 30 mariadbd mariadb --no-defaults --socket="$WORK/mysqld.sock" -u root -e "SELECT 1"
mariadb --no-defaults --socket="$WORK/mysqld.sock" -u root <<SQL
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- SLURM configuration -------------------------------------------------------------------------
mkdir -p $ETC
WRITTEN+=("$ETC/slurmdbd.conf" "$ETC/slurm.conf" "$ETC/gres.conf")
cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$S/slurmdbd.pid
LogFile=$S/slurmdbd.log
EOF
chmod 0600 "$ETC/slurmdbd.conf"
cat >"$ETC/slurm.conf" <<EOF
ClusterName=rehearsal
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_MODEL
AccountingStoreFlags=job_comment
GresTypes=gpu
NodeName=$HOST CPUs=16 RealMemory=262144 Gres=gpu:$GPU_MODEL:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
cat >"$ETC/gres.conf" <<EOF
NodeName=$HOST Name=gpu Type=$GPU_MODEL File=/dev/null
NodeName=$HOST Name=gpu Type=$GPU_MODEL File=/dev/zero
EOF

# --- daemons -------------------------------------------------------------------------------------
slurmdbd
STARTED+=("slurmdbd $S/slurmdbd.pid")
wait_for 30 slurmdbd sacctmgr -n show cluster
sacctmgr -i add cluster rehearsal >/dev/null
sacctmgr -i add account rehearsal Cluster=rehearsal Description=epmq-rehearsal Organization=epmq >/dev/null
sacctmgr -i add user "$(id -un)" Account=rehearsal Cluster=rehearsal >/dev/null
slurmctld
STARTED+=("slurmctld $S/slurmctld.pid")
wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'
slurmd
STARTED+=("slurmd $S/slurmd.pid")
wait_for 30 "slurmd (idle node)" sh -c 'sinfo -h -o %T | grep -qx idle'
echo "slurm-rehearsal: one-node SLURM up ($(sinfo -h -o '%P %c CPUs %m MB %G' | tr '\n' ';'))" >&2

# --- the DAG, locally and through SLURM ----------------------------------------------------------
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if grep -Eq '^[[:space:]]*builder:[[:space:]]*hub-' "$CONFIG"; then
    # hub suites fetch from a hub-faithful HF_HOME, offline (made once per work directory); jobs
    # inherit it (sbatch --export=ALL)
    if [[ ! -e $WORK/hf/.complete ]]; then
        rm -rf "$WORK/hf"
        HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 python "$ROOT/scripts/make_hub_fixtures.py" --hf-home "$WORK/hf" \
            >"$WORK/fixtures.log" 2>&1 || { tail -n 20 "$WORK/fixtures.log" >&2; exit 1; }
        touch "$WORK/hf/.complete"
    fi
    export HF_HOME=$WORK/hf HF_HUB_OFFLINE=1
fi
for run in local cluster; do  # suite YAMLs name config/experts.tsv relative to the working directory
    mkdir -p "$WORK/$run"
    ln -sfn "$ROOT/config" "$WORK/$run/config"
done
SNAKEMAKE=(python -m snakemake --snakefile "$ROOT/Snakefile" --configfile "$CONFIG")
unlock() {  # a run that was interrupted leaves its directory locked
    [[ -d $1/.snakemake/locks ]] && "${SNAKEMAKE[@]}" --directory "$1" --unlock >/dev/null 2>&1 || true
}
unlock "$WORK/local"
START=$SECONDS
"${SNAKEMAKE[@]}" --profile "$ROOT/profiles/local" --directory "$WORK/local" "${TARGETS[@]}" \
    >"$WORK/local.log" 2>&1 || { tail -n 40 "$WORK/local.log" >&2; exit 1; }
LOCAL_SECONDS=$((SECONDS - START))

unlock "$WORK/cluster"
[[ -e $WORK/cluster.log ]] && mv "$WORK/cluster.log" "$WORK/cluster-$(date -r "$WORK/cluster.log" +%Y%m%dT%H%M%S).log"
START=$SECONDS
SUBMITTED=$(date +%Y-%m-%dT%H:%M:%S)
# Only settings the profile does not have go on the command line (status checks sooner than a real
# cluster needs), so the profile is used as a cluster user would use it.
EPMQ_SLURM_ACCOUNT=rehearsal EPMQ_SLURM_PARTITION=cpu EPMQ_SLURM_GPU_PARTITION=gpu EPMQ_SLURM_GPU_MODEL=$GPU_MODEL \
    "${SNAKEMAKE[@]}" --profile "$ROOT/profiles/slurm" --directory "$WORK/cluster" \
    --slurm-init-seconds-before-status-checks 5 --seconds-between-status-checks 5 --verbose "${TARGETS[@]}" \
    >"$WORK/cluster.log" 2>&1 || { tail -n 60 "$WORK/cluster.log" >&2; exit 1; }
CLUSTER_SECONDS=$((SECONDS - START))
sacct --allusers --starttime "$SUBMITTED" --parsable2 --noheader -X \
    --format=JobID,Comment,Partition,Account,AllocTRES,State,ExitCode,Elapsed >"$WORK/sacct.txt"
grep -o 'sbatch call: .*' "$WORK/cluster.log" >"$WORK/sbatch-calls.txt" || true

AGAIN=$("${SNAKEMAKE[@]}" --profile "$ROOT/profiles/slurm" --directory "$WORK/cluster" -n "${TARGETS[@]}" 2>&1)
grep -q "Nothing to be done" <<<"$AGAIN" || { echo "slurm-rehearsal: a rerun would do work:" >&2; echo "$AGAIN" >&2; exit 1; }

python "$ROOT/scripts/slurm_rehearsal_check.py" --configfile "$CONFIG" --local "$WORK/local" \
    --cluster "$WORK/cluster" --cluster-log "$WORK/cluster.log" \
    --sacct "$WORK/sacct.txt" --sbatch-calls "$WORK/sbatch-calls.txt" --account rehearsal \
    --partition cpu --gpu-partition gpu --gpu-model "$GPU_MODEL"
echo "slurm-rehearsal: passed; local run ${LOCAL_SECONDS}s, SLURM run ${CLUSTER_SECONDS}s; work files in $WORK"
