#!/usr/bin/env bash
# Does the scrub slow serving? The 1 MiB / 50 connections row of compare.sh against one node,
# with its scrub running flat out and with it off, in turns, on the same data dir and port.
#
#   bash benches/scrub_serving.sh             # 3 rounds of each, 10 s wrk runs
#   ROUNDS=5 DURATION=6 bash benches/scrub_serving.sh
#
# "On" is the worst case: scrub_interval_s = 1 with a 256 MiB blob beside the served 1 MiB
# one, so the scrub never rests and reads at the default 50 MiB/s the whole time (its
# gup_scrub_bytes_total over the run is printed to prove it). "Off" is scrub_interval_s = 0.
# Loopback only; every load bounded in time. Installs wrk and curl with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
for tool in wrk curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
  fi
done
source benches/lib.sh
bench_setup scrub
printf '[upstream]\nsync_interval_s = 1\nprefetch_window_s = 0\n[store]\nscrub_interval_s = 1\n' > "$WORK/on.toml"
printf '[upstream]\nsync_interval_s = 1\nprefetch_window_s = 0\n[store]\nscrub_interval_s = 0\n' > "$WORK/off.toml"
NODE_ARGS=(--config "$WORK/on.toml")
start_manager_and_node
declare -A SHA
for spec in 1m:1048576 256m:268435456; do
  name=${spec%%:*}; size=${spec##*:}
  head -c "$size" /dev/urandom > "$WORK/$name.bin"
  SHA[$name]=$(sha256sum "$WORK/$name.bin" | cut -c1-64)
  "$GUP" admin --manager $M --token a publish "$WORK/$name.bin" --name "$name" --version 1 >/dev/null
done
for name in 1m 256m; do
  for _ in $(seq 600); do
    [ -f "$WORK/n/blobs/${SHA[$name]:0:2}/${SHA[$name]:2:2}/${SHA[$name]}" ] && break
    sleep 0.1
  done
done

restart_node() { # config
  kill "$NODE_PID" 2>/dev/null || true
  wait "$NODE_PID" 2>/dev/null || true
  "$GUP" node --config "$1" --listen 127.0.0.1:$PN --data-dir "$WORK/n" --upstream $M --upstream-token n 2>>"$WORK/n.log" & PIDS+=($!)
  NODE_PID=$!
  for _ in $(seq 100); do curl -sf $N/readyz >/dev/null && return 0; sleep 0.1; done
  echo "the node did not come back" >&2; exit 1
}

scrubbed() { curl -s $N/metrics | awk '/^gup_scrub_bytes_total/ {print $2}'; }

url=$N/v1/content/${SHA[1m]}
declare -a ON OFF
for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    restart_node "$WORK/$mode.toml"
    # Every blob falls due a second after its last check; let the scrub get going first.
    sleep 2
    wrk -t2 -c50 -d2s "$url" >/dev/null 2>&1 || true
    before=$(scrubbed)
    mib=$(wrk -t2 -c50 -d"${DURATION}s" "$url" 2>/dev/null | awk '
      /Transfer\/sec/ {v=$2; if (v ~ /GB/) {sub("GB","",v); print v*1024} else if (v ~ /MB/) {sub("MB","",v); print v+0} else {print 0}}')
    after=$(scrubbed)
    rate=$(python3 -c "print(round(($after - $before) / 1048576 / $DURATION, 1))")
    printf 'round %s, scrub %-3s: %8.0f MiB/s served, scrub read %s MiB/s\n' "$round" "$mode" "$mib" "$rate"
    if [ "$mode" = on ]; then ON+=("$mib"); else OFF+=("$mib"); fi
  done
done
python3 - "${ON[*]}" "${OFF[*]}" <<'PY'
import statistics, sys
on = [float(x) for x in sys.argv[1].split()]
off = [float(x) for x in sys.argv[2].split()]
m_on, m_off = statistics.median(on), statistics.median(off)
print(f"\n1 MiB, 50 connections: median {m_on:.0f} MiB/s with the scrub running, {m_off:.0f} without;"
      f" ratio {m_on / m_off:.2f}")
PY
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, THP $(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled)"
