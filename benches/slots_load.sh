#!/usr/bin/env bash
# Slot balance as a node feels it: CLIENTS agents (`gup loadtest`) behind one node, a 60 s
# randomization window, one release; the report's `peak_to_mean` is the most download starts
# in any one-second interval (sliding) over the mean per second, from the starts the agents
# actually made. Two cases, each with its own manager and node:
#
#   all at once:   push clients, every one hears of the release on its stream at once;
#   over 20 s:     pull clients with a 20 s heartbeat interval, so they hear of it evenly over
#                  the first 20 s of the window (the case a greedy balancer cannot even out).
#
#   bash benches/slots_load.sh                # 3,000 clients
#   CLIENTS=1000 bash benches/slots_load.sh   # fewer
#
# Loopback only; every process is bounded by --duration and killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-3000}
WINDOW_S=60
source benches/lib.sh
bench_setup slots-load
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
crowd_from_one_address

admin() { # METHOD PATH BODY
  curl -sf -X "$1" -H "Authorization: Bearer a" -H 'content-type: application/json' \
    --data "$3" "$M$2" >/dev/null
}
metric() { curl -s "$N/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

run_case() { # NAME MODE HEARTBEAT_S
  local name=$1 mode=$2 hb=$3
  WORK_CASE=$WORK/$name; mkdir -p "$WORK_CASE"
  local saved=$WORK; WORK=$WORK_CASE
  start_manager_and_node
  WORK=$saved
  open_site
  admin PUT /v1/admin/groups/default/settings \
    "{\"randomization\": {\"window_s\": $WINDOW_S}, \"heartbeat_interval_s\": $hb, \"mode\": \"$mode\"}"
  # Every client heartbeats once before the release (the node's census of whom to expect).
  local ramp=$(( hb < 20 ? hb : 20 ))
  local duration=$(( ramp + 10 + WINDOW_S + 30 ))
  "$GUP" loadtest --target "$N" --clients "$CLIENTS" --mode "$mode" --ramp-s "$ramp" \
    --duration "$duration" --events 0 --report "$WORK_CASE/report.json" > "$WORK_CASE/lt.out" 2>&1 &
  local lt=$!; PIDS+=($lt)
  sleep $(( ramp + 5 ))
  if [ "$mode" = push ]; then
    for _ in $(seq 100); do
      [ "$(metric gup_stream_clients)" -ge "$CLIENTS" ] 2>/dev/null && break
      sleep 0.2
    done
  fi
  head -c 4096 /dev/urandom > "$WORK_CASE/defs.bin"
  "$GUP" admin --manager "$M" --token a publish "$WORK_CASE/defs.bin" --name defs --version 1 >/dev/null
  wait $lt || true
  [ -n "${VERBOSE:-}" ] && cat "$WORK_CASE/lt.out"
  python3 - "$WORK_CASE/report.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<12} {r['download_starts']:>6} starts  peak_to_mean (sliding 1 s) {r['peak_to_mean']:.3f}"
      f"  by 1 s bucket {r['bucket_peak_to_mean']:.3f}  downloads ok {r['downloads_ok']} failed {r['downloads_failed']}"
      f"  upstream fetches {r['upstream_fetches']}")
PY
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  PIDS=()
}

echo "$CLIENTS clients behind one node, ${WINDOW_S} s window ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
run_case all_at_once push 300
run_case over_20s pull 20
