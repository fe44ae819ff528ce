#!/usr/bin/env bash
# System calls and context switches per request of each proxy in one round of the HTTP
# benchmark (lb, HAProxy, nginx), counted by `perf stat` on each proxy's processes: a figure
# that moves far less with the shared host's load than requests/s. A wake-up of another edge
# thread shows as a `write` (tokio's eventfd), a connection moved between threads as two
# `epoll_ctl`. Counts run for the whole bench, so a proxy's idle time (timers) is in them.
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
perfs=()
# The descendants of a process, recursively.
tree() {
  local c
  for c in $(pgrep -P "$1" || true); do echo "$c"; tree "$c"; done
}
cleanup() {
  for p in "${perfs[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  # Stopped early: the bench, what it started (lbd stops cleanly on SIGTERM) and its namespaces.
  if [ -n "$bench" ]; then
    kids=$(tree "$bench")
    kill "$bench" $kids 2>/dev/null || true
    wait "$bench" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^lbb-http-$bench-" || true); do
      ip netns del "$ns" 2>/dev/null || true
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
# Processes under the bench whose command name is `$1` (and, with `$2`, whose command line has it).
under_bench() {
  for pid in $(tree "$bench"); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || continue
    [ -z "${2:-}" ] || grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null || continue
    echo "$pid"
  done
}
"$root/target/release/lb-bench" http --protocol "$protocol" --rounds 1 --max-rounds 1 --seconds "$secs" \
  --out "$work/http.json" > "$work/bench.log" 2>&1 &
bench=$!
# All three proxies run from the start; their legs take turns.
declare -A pids=()
for _ in $(seq 600); do
  kill -0 "$bench" 2>/dev/null || { cat "$work/bench.log"; echo "the bench ended early" >&2; exit 1; }
  pids[lb]=$(under_bench lbd | paste -sd,)
  pids[haproxy]=$(under_bench haproxy | paste -sd,)
  master=$(under_bench nginx proxy.conf | head -1)
  pids[nginx]=$( (echo "$master"; [ -z "$master" ] || pgrep -P "$master") | paste -sd,)
  [ -n "${pids[lb]}" ] && [ -n "${pids[haproxy]}" ] && [ -n "$master" ] && break
  sleep 0.1
done
for p in lb haproxy nginx; do
  [ -n "${pids[$p]}" ] || { echo "no $p process under the bench" >&2; exit 1; }
done
calls=(write writev sendto sendmsg recvfrom read readv recvmsg epoll_wait epoll_ctl futex)
ev=$(printf 'syscalls:sys_enter_%s,' "${calls[@]}")context-switches
for p in lb haproxy nginx; do
  perf stat -x, -e "$ev" -p "${pids[$p]}" -o "$work/$p.csv" &
  perfs+=($!)
done
wait "$bench" || { cat "$work/bench.log"; exit 1; }
bench=
for p in "${perfs[@]}"; do kill -INT "$p" 2>/dev/null || true; done
for p in "${perfs[@]}"; do wait "$p" 2>/dev/null || true; done
perfs=()
python3 - "$work" "$secs" "$protocol" <<'PY'
import json, re, sys
work, secs, protocol = sys.argv[1], float(sys.argv[2]), sys.argv[3]
log = open(f"{work}/bench.log").read()
report = json.load(open(f"{work}/http.json"))
print(f"{protocol}: per request (requests = req/s x {secs:.0f} s, plus the HTTP/1.1 wire round's)")
for p in ("lb", "haproxy", "nginx"):
    m = re.search(rf"http bench: {p} {protocol}: (\d+) req/s", log)
    if not m:
        sys.exit(f"{p}: no requests in the bench's log")
    req = int(m.group(1)) * secs
    req += report["proxies"][p][protocol].get("wire", {}).get("paired", 0)
    counts = {}
    for line in open(f"{work}/{p}.csv"):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit():
            counts[f[2].replace("syscalls:sys_enter_", "")] = int(f[0])
    if not counts:
        sys.exit(f"{p}: perf counted nothing")
    shown = {k: v / req for k, v in counts.items() if v / req >= 0.005}
    total = sum(v for k, v in shown.items() if k != "context-switches")
    print(f"{p:8} {int(m.group(1)):>7} req/s  system calls {total:.2f}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
PY
