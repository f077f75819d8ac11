#!/usr/bin/env bash
# Install what the local SLURM cluster (scripts/slurm/local_cluster.sh) and the tests under
# tests/launch need: Debian's slurm-wlm and munge. `make test` runs this once (stamp file in
# .venv); it is idempotent and quiet, and never fails the build: where it cannot install (not
# root, no apt-get, no network) it says so in one line and the SLURM tests skip, naming why.
#
#   scripts/slurm/install_packages.sh [LOGFILE]   # apt-get output goes to LOGFILE (default /tmp)
set -uo pipefail

log="${1:-${TMPDIR:-/tmp}/megatron_grow-apt.log}"
have_all() {
    local tool
    for tool in slurmctld slurmd munged sbatch scontrol; do
        command -v "$tool" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[install] slurm-wlm/munge missing and not installable here (needs root and apt-get):" \
         "the SLURM tests will skip. As root: apt-get install -y slurm-wlm munge"
    exit 0
fi
echo "[install] apt-get install slurm-wlm munge (first use only; log: $log)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
    apt-get update -q >>"$log" 2>&1
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1
fi
if have_all; then
    echo "[install] slurm-wlm and munge installed"
else
    echo "[install] could not install slurm-wlm/munge (see $log): the SLURM tests will skip"
fi
exit 0
