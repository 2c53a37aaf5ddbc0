#!/usr/bin/env bash
# Sets up protobench in ./.venv; safe to run again (a second run only checks).
#   ./setup.sh          the package and the MNIST / Fashion-MNIST data
#   ./setup.sh --test   the same, plus the test tools and what the tests start (browser, servers)
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
python=${PYTHON:-python3}

# 1. A virtual environment with the package, re-installed only when pyproject.toml changes.
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
stamp=.venv/.protobench-setup
if [ "$mode" = "--test" ]; then
  extras="[test]"
  stamp=.venv/.protobench-setup-test
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
  echo "$want" > "$stamp"
fi

# 2. System packages, only where we are root with apt (elsewhere the data falls back to
#    other sources, and tests that need a missing program skip with the reason).
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || \
      echo "setup: could not install ${missing[*]}; continuing without" >&2
  fi
}
packages=(dataset-fashion-mnist)
new_postgres=""
if [ "$mode" = "--test" ]; then
  # tests/test_distributed.py starts clusters of its own; tests/test_report.py a browser.
  packages+=(postgresql chromium)
  dpkg -s postgresql >/dev/null 2>&1 || new_postgres=1
fi
apt_install "${packages[@]}"
# Debian's package starts a cluster of its own on installation: the tests do not use it.
if [ -n "$new_postgres" ] && command -v pg_lsclusters >/dev/null; then
  pg_lsclusters -h | while read -r version cluster _; do
    pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
  done
fi

# 3. The data sets, fetched and verified once.
.venv/bin/bench data fetch mnist fashion-mnist
