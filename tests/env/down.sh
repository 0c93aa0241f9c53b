#!/usr/bin/env bash
# down.sh STATE: runs the stop commands components registered in STATE/stops (the cluster's
# pods, mounts and network need more than a signal), last registered first, then stops every
# session that spawn recorded in STATE/pids, last started first.
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
mapfile -t sessions < <(tac "$state/pids")
for entry in "${sessions[@]}"; do
  read -r sid name <<<"$entry"
  [[ -n $sid && -n $(session_groups "$sid") ]] || continue
  log "stopping $name"
  stop_session "$sid"
done
: >"$state/pids"
