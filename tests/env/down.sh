#!/usr/bin/env bash
# down.sh STATE: runs the stop commands components registered in STATE/stops (the cluster's
# pods, mounts and network need more than a signal), last registered first, then stops every
# process group that the component scripts recorded in STATE/pids, last started first.
source "$(dirname "$0")/lib.sh"

state=${1:?usage: down.sh STATE}
if [[ -f $state/stops ]]; then
  tac "$state/stops" | while IFS= read -r command; do
    bash -c "$command" || log "a stop step failed: $command"
  done
  : >"$state/stops"
fi
[[ -f $state/pids ]] || exit 0
# Last started first, each given up to 15 s: an API server whose etcd is already gone
# would wait out its whole grace period.
mapfile -t groups < <(tac "$state/pids")
for entry in "${groups[@]}"; do
  read -r pid name <<<"$entry"
  [[ -n $pid ]] || continue
  kill -TERM -- "-$pid" 2>/dev/null || continue
  log "stopping $name"
  deadline=$((SECONDS + 15))
  while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
done
: >"$state/pids"
