#!/usr/bin/env bash
# The package, as a user gets it. Run from the repository root after
# `pip install -e '.[test]'` (which brings build and twine):
#
#   bash .ci/package-check.sh
#
#   1. python -m build: an sdist, and a wheel built from that sdist (so the
#      sdist holds everything the package needs);
#   2. twine check --strict on both (metadata, README rendering);
#   3. the wheel holds the fs_zammad package only, named with the version
#      from fs_zammad/__init__.py (the one place it is written);
#   4. the wheel in a fresh venv: `fs-zammad --version` prints that version
#      and `fs-zammad replay` of a recorded call prints exactly what the
#      checkout prints.
#
# PYTHON (default .venv/bin/python) runs build and twine; python3 makes the
# fresh venv.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
FIXTURE=$PWD/tests/fixtures/callcentre/S1/events_all.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() { echo "package-check: FAIL: $*" >&2; exit 1; }

version=$("$PYTHON" -c 'import fs_zammad; print(fs_zammad.__version__)')
echo "== build fs-zammad $version"
"$PYTHON" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; fail "python -m build"; }
sdist=$work/dist/fs_zammad-$version.tar.gz
wheel=$work/dist/fs_zammad-$version-py3-none-any.whl
[ -f "$sdist" ] && [ -f "$wheel" ] || fail "expected $(basename "$sdist") and $(basename "$wheel"), got: $(ls "$work/dist")"

echo "== twine check"
"$PYTHON" -m twine check --strict "$sdist" "$wheel"

echo "== wheel contents"
strays=$("$PYTHON" -m zipfile -l "$wheel" | awk 'NR > 1 {print $1}' \
    | grep -v -e '^fs_zammad/' -e "^fs_zammad-$version\.dist-info/" || true)
[ -z "$strays" ] || fail "the wheel holds more than the package: $strays"

echo "== the wheel in a fresh venv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel"
got=$(cd "$work" && "$work/venv/bin/fs-zammad" --version)
[ "$got" = "fs-zammad $version" ] || fail "--version printed '$got', not 'fs-zammad $version'"
echo "$got"
# Run outside the checkout, so the installed package is what runs.
installed=$(cd "$work" && env -u ZAMMAD_CTI_URL "$work/venv/bin/fs-zammad" replay "$FIXTURE")
checkout=$(env -u ZAMMAD_CTI_URL "$(dirname "$PYTHON")/fs-zammad" replay "$FIXTURE")
echo "$installed"
grep -q '^event=hangup&direction=in&callId=' <<<"$installed" || fail "replay sent no hangup"
[ "$installed" = "$checkout" ] || fail "the installed replay differs from the checkout's:
$checkout"
echo "package-check: ok (fs-zammad $version: sdist, wheel, twine, installed --version and replay)"
