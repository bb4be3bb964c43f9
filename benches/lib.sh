# Set-up shared by the bench scripts (sourced, not run): a release build, a work directory
# that is removed on exit with every process the script started, free loopback ports, and a
# manager with a node in front of it.

# bench_setup NAME: builds gup, sets GUP, WORK (/tmp/gup-NAME.*) and PIDS (every pid added to
# it is killed on exit, then WORK is removed).
bench_setup() {
  cargo build --release -q
  # The binary cargo just built, wherever CARGO_TARGET_DIR puts it.
  GUP=${CARGO_TARGET_DIR:-$PWD/target}/release/gup
  WORK=$(mktemp -d "/tmp/gup-$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT INT TERM
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# crowd_from_one_address: every simulated client of `gup loadtest` comes from 127.0.0.1, so
# lift the node's per-address limits meant for a LAN (1,024 connections, 512 streams, 600 new
# client ids a minute per address): a crowd bench measures the node, not those limits.
crowd_from_one_address() {
  printf '[node]\n[limits]\nmax_connections_per_address = 100000\nmax_streams_per_address = 100000\nnew_clients_per_minute = 0\n' > "$WORK/node.toml"
  NODE_ARGS=(--config "$WORK/node.toml")
}

# open_site: the manager takes clients without enrolment (`client_auth = open`), as a crowd
# of simulated agents has no credentials.
open_site() {
  curl -sf -X PUT -H "Authorization: Bearer a" -H 'content-type: application/json' \
    --data '{"client_auth":"open"}' "$M/v1/admin/site" >/dev/null
}

# start_manager_and_node: a manager (admin token "a", node token "n") and a node mirroring it,
# on free 127.0.0.1 ports, logs in WORK; sets PM, PN, M, N (their URLs) and NODE_PID, and
# returns once both answer (the node ready). NODE_ARGS (an array, optional) is added to the
# node's command line (e.g. --config FILE).
start_manager_and_node() {
  PM=$(free_port); PN=$(free_port)
  M=http://127.0.0.1:$PM; N=http://127.0.0.1:$PN
  "$GUP" manager --listen 127.0.0.1:$PM --data-dir "$WORK/m" --admin-token a --node-token n 2>"$WORK/m.log" & PIDS+=($!)
  "$GUP" node --listen 127.0.0.1:$PN --data-dir "$WORK/n" --upstream $M --upstream-token n "${NODE_ARGS[@]+"${NODE_ARGS[@]}"}" 2>"$WORK/n.log" & PIDS+=($!)
  NODE_PID=$!
  for _ in $(seq 100); do
    curl -sf $N/readyz >/dev/null && curl -sf $M/healthz >/dev/null && return 0
    sleep 0.1
  done
  echo "the manager or the node did not start within 10 s" >&2
  return 1
}
