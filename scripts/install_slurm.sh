#!/usr/bin/env bash
# Installs the Slurm daemons, client tools and munge from the distribution's packages
# (Debian/Ubuntu: slurmctld, slurmd, slurm-client, munge) when they are missing. The test
# suite (tests/slurm) starts its own one-node cluster from them under a temporary
# directory; nothing here starts or configures a system-wide service.
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch scontrol munged; do
  command -v "$bin" >/dev/null || [[ -x "/usr/sbin/$bin" ]] || need+=("$bin")
done
if [[ ${#need[@]} -eq 0 ]]; then
  exit 0
fi
echo "[install_slurm] missing ${need[*]}: installing slurmctld slurmd slurm-client munge" >&2
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "[install_slurm] not root and no sudo: install slurmctld slurmd slurm-client munge by hand" >&2; exit 1; }
  sudo_cmd=(sudo -n)
fi
command -v apt-get >/dev/null || { echo "[install_slurm] no apt-get: install Slurm (slurmctld, slurmd, client tools) and munge with your package manager" >&2; exit 1; }
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client munge >/dev/null
