#!/usr/bin/env bash
# A command that outlasts one device call (10 minutes at most): started in its own
# process session, it runs on after the call returns, until the machine is given back
# (30 s idle); a later call on the same warm machine waits for it again.
#
#   scripts/device_detached.sh start SECONDS CMD...   start CMD, wait up to SECONDS
#   scripts/device_detached.sh wait SECONDS           wait up to SECONDS more
#
# CMD runs from the repository root; its output goes to /tmp/detached/log and its exit
# status to /tmp/detached/rc. This script exits 0 when CMD finished with 0, 3 while CMD is
# still running, else CMD's status; it prints the log's tail either way.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=/tmp/detached
action=${1:?start or wait}
seconds=${2:?seconds to wait}
shift 2
if [[ $action == start ]]; then
  rm -rf "$dir" && mkdir -p "$dir"
  setsid bash -c '"$@" >"$0/log" 2>&1; echo $? >"$0/rc"' "$dir" "$@" </dev/null &
elif [[ $action != wait ]]; then
  echo "device_detached.sh: unknown action '$action' (start or wait)" >&2
  exit 2
fi
deadline=$((SECONDS + seconds))
while [[ ! -f $dir/rc && $SECONDS -lt $deadline ]]; do
  sleep 5
done
tail -n 20 "$dir/log" 2>/dev/null
if [[ -f $dir/rc ]]; then
  echo "detached command finished: exit $(cat "$dir/rc")"
  exit "$(cat "$dir/rc")"
fi
echo "detached command still running after ${seconds} s more"
exit 3
