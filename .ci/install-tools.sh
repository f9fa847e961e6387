#!/usr/bin/env bash
# Installs the tools the ops checks run for real, when missing: promtool and
# the Prometheus server (Debian's prometheus package), systemd-analyze (systemd).
# Never starts them as system services: the tests start their own.
set -euo pipefail

missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} (Debian packages) for the ops checks"
# No service may start during the install (a policy-rc.d that says no).
policy=/usr/sbin/policy-rc.d
own_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
fi
trap 'if [ -n "$own_policy" ]; then rm -f "$policy"; fi' EXIT
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
