#!/usr/bin/env bash
# down.sh STATE: runs the stop commands components registered in STATE/stops (the cluster's
# pods, mounts and network need more than a signal), last registered first, then stops every
# process group that the component scripts recorded in STATE/pids.
source "$(dirname "$0")/lib.sh"

state=${1:?usage: down.sh STATE}
if [[ -f $state/stops ]]; then
  tac "$state/stops" | while IFS= read -r command; do
    bash -c "$command" || log "a stop step failed: $command"
  done
  : >"$state/stops"
fi
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
