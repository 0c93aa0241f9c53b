#!/usr/bin/env bash
# down.sh STATE: stops every process group that the component scripts recorded in STATE/pids.
source "$(dirname "$0")/lib.sh"

state=${1:?usage: down.sh STATE}
[[ -f $state/pids ]] || exit 0
pids=()
while read -r pid name; do
  [[ -n $pid ]] || continue
  kill -TERM -- "-$pid" 2>/dev/null && pids+=("$pid") && log "stopping $name"
done <"$state/pids"
deadline=$((SECONDS + 15))
for pid in "${pids[@]}"; do
  while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
done
: >"$state/pids"
