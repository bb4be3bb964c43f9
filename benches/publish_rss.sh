#!/usr/bin/env bash
# Peak RSS of the manager while publishing a 1 GiB file.
#
# Builds the release binary, makes a 1 GiB file of random bytes in a temp dir, starts
# `gup manager` on a free loopback port with its data dir in that temp dir, publishes the
# file with `gup admin ... publish`, then reads the manager's VmHWM (peak resident set) from
# /proc/PID/status. The target is a peak below 100 MiB: the upload must be streamed to disk,
# never held in memory. Loopback only; every step is bounded in time; the manager and the
# temp dir are removed on exit, whatever happens.
#
# Usage: benches/publish_rss.sh            (from anywhere; about 1 minute after the build)
#        SIZE=256M benches/publish_rss.sh  (another size, in `head -c` syntax)
set -euo pipefail

cd "$(dirname "$0")/.."
size="${SIZE:-1G}"
token=bench
limit_mib=100

work=""
manager_pid=""
publish_pid=""
cleanup() {
    local rc=$?
    if [[ -n "$publish_pid" ]] && kill -0 "$publish_pid" 2>/dev/null; then
        kill -TERM "$publish_pid" 2>/dev/null || true
        wait "$publish_pid" 2>/dev/null || true
    fi
    if [[ -n "$manager_pid" ]] && kill -0 "$manager_pid" 2>/dev/null; then
        kill -TERM "$manager_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$manager_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$manager_pid" 2>/dev/null || true
        wait "$manager_pid" 2>/dev/null || true
    fi
    if [[ -n "$work" ]]; then
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

timeout 1800 cargo build --release --quiet
gup="$PWD/target/release/gup"

work="$(mktemp -d "${TMPDIR:-/tmp}/gup-publish-rss.XXXXXX")"
file="$work/big.bin"
echo "making $size of random bytes in $file"
head -c "$size" /dev/urandom >"$file"
bytes=$(stat -c %s "$file")

port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
: >"$work/manager.log"
RUST_LOG=info NO_COLOR=1 "$gup" manager --listen "127.0.0.1:$port" --data-dir "$work/data" \
    --admin-token "$token" 2>"$work/manager.log" &
manager_pid=$!

for _ in $(seq 100); do
    if grep -q "manager listening" "$work/manager.log"; then
        break
    fi
    if ! kill -0 "$manager_pid" 2>/dev/null; then
        echo "the manager exited early:" >&2
        cat "$work/manager.log" >&2
        exit 1
    fi
    sleep 0.1
done
if ! grep -q "manager listening" "$work/manager.log"; then
    echo "the manager did not start listening within 10 s:" >&2
    cat "$work/manager.log" >&2
    exit 1
fi

kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$manager_pid/status"; }
echo "manager pid $manager_pid on $url; before publishing: VmRSS $(($(kib VmRSS) / 1024)) MiB, VmHWM $(($(kib VmHWM) / 1024)) MiB"

start=$(date +%s.%N)
# In the background so that a signal interrupts `wait` at once and the trap cleans up.
timeout 600 "$gup" admin --manager "$url" --token "$token" \
    publish "$file" --name big --version 1 &
publish_pid=$!
if ! wait "$publish_pid"; then
    echo "publish failed; manager log:" >&2
    tail -n 20 "$work/manager.log" >&2
    exit 1
fi
end=$(date +%s.%N)

hwm_kib=$(kib VmHWM)
rss_kib=$(kib VmRSS)
echo "peak RSS of the manager while publishing $size: $((hwm_kib / 1024)) MiB (VmHWM $hwm_kib kB; VmRSS now $((rss_kib / 1024)) MiB)"
awk -v s="$start" -v e="$end" -v b="$bytes" 'BEGIN {
    t = e - s
    printf "publish time: %.2f s, throughput: %.1f MiB/s\n", t, b / 1048576 / t
}'
if ((hwm_kib >= limit_mib * 1024)); then
    echo "over the target of $limit_mib MiB" >&2
    exit 1
fi
