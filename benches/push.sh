#!/usr/bin/env bash
# Push streams at scale: node memory per idle stream, and the time from a publish until the
# last of the streams has heard of it. Loopback only, bounded in time.
#
#   bash benches/push.sh                # 10,000 streams
#   CLIENTS=2000 bash benches/push.sh   # fewer
#
# Starts a manager and a node (release build) on free 127.0.0.1 ports, publishes one small
# item (so that the simulated clients have a download pending in their slots and stay), opens
# CLIENTS push streams with `gup loadtest --mode push`, reads the node's private memory
# (RssAnon, so that mapped blob files, which are page cache, do not count) before and with the
# streams, then publishes a second item and reads from the loadtest's report when the last
# client heard of the new revision on its stream (each client stamps the event as it arrives).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-10000}
source benches/lib.sh
bench_setup push
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
crowd_from_one_address
start_manager_and_node
open_site

metric() { curl -s "$N/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
revision() { curl -s "$N/v1/catalog" | python3 -c 'import json,sys; print(json.load(sys.stdin)["revision"])'; }
publish() { # name
  head -c 1024 /dev/urandom > "$WORK/$1.bin"
  "$GUP" admin --manager $M --token a publish "$WORK/$1.bin" --name "$1" --version 1 >/dev/null
}
publish first
for _ in $(seq 100); do [ "$(revision)" -ge 1 ] && break; sleep 0.1; done

rss() { awk '/RssAnon/ {print $2}' /proc/$1/status; }
before=$(rss $NODE_PID)
DURATION=$(( 40 + CLIENTS / 250 ))
"$GUP" loadtest --target $N --clients "$CLIENTS" --mode push --ramp-s 5 --duration "$DURATION" --events 0 \
  --report "$WORK/report.json" > "$WORK/lt.out" 2>&1 &
LT=$!; PIDS+=($LT)
streams=0
for _ in $(seq $(( DURATION * 5 ))); do
  streams=$(metric gup_stream_clients); streams=${streams:-0}
  [ "$streams" -ge "$CLIENTS" ] && break
  sleep 0.2
done
sleep 2
after=$(rss $NODE_PID)
streams=$(metric gup_stream_clients)
publish_ms=$(python3 -c 'import time; print(int(time.time()*1000))')
publish second
wait $LT || true
python3 - "$WORK/report.json" "$before" "$after" "${streams:-0}" "$publish_ms" "$CLIENTS" <<'PY'
import json, sys
path, before, after, streams, publish_ms, clients = sys.argv[1], *map(int, sys.argv[2:])
report = json.load(open(path))
per = (after - before) / max(1, streams)
print(f"{streams} idle push streams: node private memory {before/1024:.0f} MiB -> {after/1024:.0f} MiB, "
      f"{per:.1f} KiB per stream (target <= 10)")
heard = [h for h in report.get("push_heard", []) if h["revision"] >= 2]
if not heard:
    print("no client heard of the publish"); sys.exit(1)
h = heard[0]
print(f"publish -> revision {h['revision']} heard by {h['clients']} of {clients} clients; "
      f"first after {h['first_unix_ms'] - publish_ms} ms, last after {h['last_unix_ms'] - publish_ms} ms (target <= 1000)")
PY
