#!/usr/bin/env bash
# A/B: two builds of gup serving the same files, measured in turns in one run, so that a
# shared, noisy machine weighs on both alike. Loopback only, every load bounded in time.
#
#   bash benches/ab.sh OLD_GUP NEW_GUP            # 6 rounds of 1 KiB @ 1000 and 1 MiB @ 50
#   ROUNDS=10 DURATION=5 bash benches/ab.sh A B
#
# Starts a manager and a node of each build on free 127.0.0.1 ports, publishes the same 1 KiB
# and 1 MiB files to both, then alternates wrk runs (A, B, B, A, ...) and prints each run and
# the median of each with the ratio B / A.
set -euo pipefail
A=$1; B=$2
ROUNDS=${ROUNDS:-6}; DURATION=${DURATION:-5}
command -v wrk >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
WORK=$(mktemp -d /tmp/gup-ab.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$WORK"' EXIT INT TERM
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
head -c 1024 /dev/urandom > "$WORK/1k.bin"; head -c 1048576 /dev/urandom > "$WORK/1m.bin"
declare -A NODE
for side in A B; do
  bin=${!side}; pm=$(free_port); pn=$(free_port)
  "$bin" manager --listen 127.0.0.1:$pm --data-dir "$WORK/$side-m" --admin-token a --node-token n 2>"$WORK/$side-m.log" & PIDS+=($!)
  "$bin" node --listen 127.0.0.1:$pn --data-dir "$WORK/$side-n" --upstream http://127.0.0.1:$pm --upstream-token n 2>"$WORK/$side-n.log" & PIDS+=($!)
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$pn/readyz >/dev/null && break; sleep 0.1; done
  for f in 1k 1m; do "$bin" admin --manager http://127.0.0.1:$pm --token a publish "$WORK/$f.bin" --name $f --version 1 >/dev/null; done
  NODE[$side]=http://127.0.0.1:$pn
done
sha() { sha256sum "$WORK/$1.bin" | cut -c1-64; }
S1K=$(sha 1k); S1M=$(sha 1m)
for side in A B; do
  for s in $S1K $S1M; do
    for _ in $(seq 100); do curl -sf -o /dev/null "${NODE[$side]}/v1/content/$s" && break; sleep 0.1; done
  done
done
run() { # side sha conns -> req/s
  wrk -t2 -c"$3" -d"${DURATION}s" "${NODE[$1]}/v1/content/$2" | awk '/Requests\/sec/ {print $2}'
}
declare -A R
for w in "1k:$S1K:1000" "1m:$S1M:50"; do
  IFS=: read -r name s conns <<<"$w"
  for i in $(seq "$ROUNDS"); do
    order="A B"; [ $((i % 2)) -eq 0 ] && order="B A"
    for side in $order; do
      v=$(run $side $s $conns); R[$name-$side]+="$v "
      echo "$name @ $conns  round $i  $side  $v req/s"
    done
  done
done
python3 - "${R[1k-A]}" "${R[1k-B]}" "${R[1m-A]}" "${R[1m-B]}" <<'PY'
import statistics, sys
a1, b1, am, bm = ([float(x) for x in s.split()] for s in sys.argv[1:])
for name, a, b, unit in (("1 KiB @ 1000", a1, b1, "req/s"), ("1 MiB @ 50", [x for x in am], [x for x in bm], "MiB/s")):
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name}: A median {ma:,.0f} {unit if unit=='req/s' else 'req/s (= MiB/s)'}, B median {mb:,.0f}; B/A {mb/ma:.3f}")
PY
