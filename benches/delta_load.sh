#!/usr/bin/env bash
# Deltas under a crowd (issue 22): CLIENTS agents (`gup loadtest`) behind one node all hold
# version 1 of a SIZE_MIB file; version 2 rewrites 1% of its 4 KiB blocks at random places and
# appends 1 MiB. The same run twice, each on its own manager and node: with deltas (the agents
# take the manager's listed delta and rebuild version 2) and with `--no-deltas` (full
# downloads). Prints WAN bytes (node <- manager: the same in both runs, since the node keeps
# the full version 2 for clients without version 1), LAN bytes (node -> agents), the ratio.
#
#   bash benches/delta_load.sh                         # 1,000 agents, 100 MiB
#   CLIENTS=200 SIZE_MIB=16 bash benches/delta_load.sh # smaller
#
# Loopback only; every load is bounded by --duration and every process killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-1000}
SIZE_MIB=${SIZE_MIB:-100}
WINDOW_S=${WINDOW_S:-30}
source benches/lib.sh
bench_setup delta-load
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
crowd_from_one_address

python3 - "$WORK" "$SIZE_MIB" <<'PY'
import os, random, sys
work, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(22)
v1 = bytearray(rng.randbytes(mib << 20))
v2 = bytearray(v1)
blocks = len(v1) // 4096
for b in rng.sample(range(blocks), blocks // 100):
    v2[b * 4096:(b + 1) * 4096] = rng.randbytes(4096)
v2 += rng.randbytes(1 << 20)
open(os.path.join(work, "defs-1.bin"), "wb").write(v1)
open(os.path.join(work, "defs-2.bin"), "wb").write(v2)
print(f"version 1: {len(v1)} bytes; version 2: {len(v2)} bytes, {blocks // 100} of {blocks} 4 KiB blocks rewritten, 1 MiB appended")
PY
SHA1=$(sha256sum "$WORK/defs-1.bin" | cut -c1-64)
SHA2=$(sha256sum "$WORK/defs-2.bin" | cut -c1-64)

metric() { curl -s "$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

run_case() { # NAME LOADTEST_FLAGS...
  local name=$1; shift
  local saved=$WORK; WORK=$WORK/$name; mkdir -p "$WORK"
  start_manager_and_node
  WORK=$saved
  open_site
  curl -sf -X PUT -H "Authorization: Bearer a" -H 'content-type: application/json' \
    --data "{\"randomization\": {\"window_s\": $WINDOW_S}, \"heartbeat_interval_s\": 5, \"mode\": \"push\"}" \
    "$M/v1/admin/groups/default/settings" >/dev/null
  "$GUP" admin --manager "$M" --token a publish "$WORK/defs-1.bin" --name defs --version 1 >/dev/null
  "$GUP" admin --manager "$M" --token a publish "$WORK/defs-2.bin" --name defs --version 2 >/dev/null
  # The node holds version 2 and, with deltas, the listed delta: what its agents ask for.
  local t0; t0=$(date +%s.%N)
  for _ in $(seq 1200); do
    if curl -sf "$N/v1/catalog" | python3 -c "
import json, sys
c = json.load(sys.stdin)
i = [i for i in c['items'] if i['sha256'] == '$SHA2']
sys.exit(0 if i and any(d['from_sha256'] == '$SHA1' for d in i[0].get('deltas', [])) else 1)"; then
      break
    fi
    sleep 0.1
  done
  local t1; t1=$(date +%s.%N)
  local delta_size; delta_size=$(curl -sf "$N/v1/catalog" | python3 -c "
import json, sys
c = json.load(sys.stdin)
print([d['size'] for i in c['items'] if i['sha256'] == '$SHA2' for d in i.get('deltas', []) if d['from_sha256'] == '$SHA1'][0])")
  for _ in $(seq 600); do
    [ -f "$WORK/$name/n/blobs/${SHA2:0:2}/${SHA2:2:2}/$SHA2" ] && break
    sleep 0.1
  done
  "$GUP" loadtest --target "$N" --clients "$CLIENTS" --duration $((WINDOW_S + 600)) --events 0 \
    --holding "$WORK/defs-1.bin" --holding-name defs --report "$WORK/$name.json" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err"
  local wan1; wan1=$(metric "$N" gup_upstream_bytes_total)
  python3 - "$WORK/$name.json" "$name" "$delta_size" "$wan1" "$t0" "$t1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name, delta, wan, t0, t1 = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
print(f"{name}: {r['downloads_ok']} of {r['clients']} verified, installs {r['installs']}, fallbacks {r['delta_fallbacks']}, "
      f"LAN {r['lan_bytes']} bytes, WAN {wan:.0f} bytes (the node's every fetch: version 1, version 2, the delta), delta {delta} bytes listed "
      f"{t1 - t0:.1f} s after publishing, rebuild p50 {r['rebuild_ms']['p50']:.0f} ms p99 {r['rebuild_ms']['p99']:.0f} ms")
open(sys.argv[1] + ".lan", "w").write(str(r['lan_bytes']))
PY
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  PIDS=()
}

run_case deltas
run_case full --no-deltas
python3 - "$WORK/deltas.json.lan" "$WORK/full.json.lan" <<'PY'
import sys
d, f = (int(open(p).read()) for p in sys.argv[1:])
print(f"LAN bytes with deltas {d} against full downloads {f}: {100 * (1 - d / f):.2f}% fewer (target >= 95%)")
PY
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, THP $(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled); $CLIENTS agents, $SIZE_MIB MiB"
