#!/usr/bin/env bash
# Debian packages the system tests (tests/test_system.py) need: an SSH server/client, pdsh, munge, Slurm, and ip/tc
# for the hosts of tests/rigs/cluster.py (iproute2; unshare and nsenter come with util-linux, always there).
# Idempotent: installs only what is missing, and only as root (otherwise prints what to install and exits 0,
# so the system tests skip with their own reason).
set -euo pipefail

PKGS=(openssh-server openssh-client pdsh munge slurm-wlm slurmctld slurmd slurm-client iproute2)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system_deps: all present (${PKGS[*]})"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system_deps: not root or no apt-get; the system tests will skip. Missing: ${missing[*]}"
    exit 0
fi
echo "system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: install without starting services (the tests start their own daemons on their own config)
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system_deps: done"
