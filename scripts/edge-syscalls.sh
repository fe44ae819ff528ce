#!/usr/bin/env bash
# System calls and context switches per request of each proxy in one round of the HTTP
# benchmark (lb, HAProxy, nginx), counted by `perf stat` on each proxy's processes: a figure
# that moves far less with the shared host's load than requests/s. A wake-up of another edge
# thread shows as a `write` (tokio's eventfd), a connection moved between threads as two
# `epoll_ctl`.
#
#   cargo build --release --bins && scripts/edge-syscalls.sh [http|https|h2] [seconds]
#
# Needs perf (Debian package linux-perf) beside what `cargo xtask bench http` installs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
protocol=${1:-h2}
secs=${2:-8}
work=$(mktemp -d /tmp/lb-syscalls.XXXXXX)
bench=
cleanup() {
  pkill -INT -f "perf stat -e syscalls.*-o $work" 2>/dev/null || true
  [ -n "$bench" ] && kill "$bench" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
touch "$root/target/release/lbd"
"$root/target/release/lb-bench" http --protocol "$protocol" --rounds 1 --max-rounds 1 --seconds "$secs" \
  --out "$work/http.json" > "$work/bench.log" 2>&1 &
bench=$!
# All three proxies run from the start; their legs take turns.
for _ in $(seq 600); do
  pgrep -x lbd >/dev/null && pgrep -x haproxy >/dev/null && pgrep -f "nginx: master.*proxy" >/dev/null && break
  sleep 0.1
done
calls=(write writev sendto sendmsg recvfrom read readv recvmsg epoll_wait epoll_ctl futex)
ev=$(printf 'syscalls:sys_enter_%s,' "${calls[@]}")context-switches
# nginx's backend runs too: the proxy is the master started with its own config, and its
# workers.
master=$(pgrep -f "nginx: master.*proxy" | head -1)
declare -A pids=(
  [lb]=$(pgrep -x lbd | paste -sd,)
  [haproxy]=$(pgrep -x haproxy | paste -sd,)
  [nginx]=$( (echo "$master"; pgrep -P "$master") | paste -sd,)
)
for p in lb haproxy nginx; do
  perf stat -e "$ev" -p "${pids[$p]}" -o "$work/$p.txt" &
done
wait "$bench" || { cat "$work/bench.log"; exit 1; }
bench=
pkill -INT -f "perf stat -e syscalls.*-o $work" || true
wait 2>/dev/null || true
python3 - "$work" "$secs" "$protocol" <<'PY'
import re, sys
work, secs, protocol = sys.argv[1], float(sys.argv[2]), sys.argv[3]
log = open(f"{work}/bench.log").read()
names = {"lb": "lb", "haproxy": "haproxy", "nginx": "nginx"}
print(f"{protocol}: per request (requests = req/s x {secs:.0f} s)")
cols = None
for p in names:
    m = re.search(rf"http bench: {p} {protocol}: (\d+) req/s", log)
    text = open(f"{work}/{p}.txt").read()
    counts = {k.replace("syscalls:sys_enter_", ""): int(v.replace(",", ""))
              for v, k in re.findall(r"^\s*([\d,]+)\s+(\S+)", text, re.M)}
    if not m:
        print(f"{p}: no requests in the log"); continue
    req = int(m.group(1)) * secs
    shown = {k: v / req for k, v in counts.items() if v / req >= 0.005}
    total = sum(v for k, v in shown.items() if k != "context-switches")
    print(f"{p:8} {int(m.group(1)):>7} req/s  system calls {total:.2f}: " +
          ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
PY
