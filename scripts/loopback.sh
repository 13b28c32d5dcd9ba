#!/usr/bin/env bash
# Run a command whose network traffic stays on this machine's loopback: inside a private
# network namespace that holds only `lo` (needs root and unshare; tests and benchmarks that
# start Ray use it, because Ray binds to the machine's network address even when told
# 127.0.0.1, see docs/evolve.md). Where no namespace can be made (a user's machine), the
# command runs on the machine's network, and EVOMERGE_RAY_ANY_NETWORK=1 tells the Ray tests
# so. Anything that needs the network (pip) must run before, outside.
#   usage: bash scripts/loopback.sh COMMAND [ARG...]
set -euo pipefail
if unshare -n true 2>/dev/null && command -v ip >/dev/null 2>&1; then
    exec unshare -n bash -c 'ip link set lo up && exec "$@"' loopback "$@"
fi
echo "loopback.sh: no private network namespace here (needs root, unshare and ip); running on this machine's network" >&2
EVOMERGE_RAY_ANY_NETWORK=1 exec "$@"
