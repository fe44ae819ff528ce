#!/usr/bin/env bash
# Bytes lbd's edge threads copy with memmove per proxied HTTP/1.1 request (mostly futures and
# responses moved between async frames), counted with uprobes while the HTTP benchmark's lb
# leg runs. Like scripts/edge-instructions.sh, a figure that does not move with the host's
# load. `SITES=1` adds the copies by size and calling function (DWARF call graphs; slower).
#
#   cargo build --release --bins && scripts/edge-copies.sh
#
# Needs perf (Debian package linux-perf) and uprobes (root).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
lbd=$root/target/release/lbd
libc=$(ldd "$lbd" | awk '/libc.so/{print $3}')
# glibc picks its memmove by CPU at load time: every variant it has is probed (not the
# `_chk` ones, which jump into them and would count twice).
variants=$(perf probe -x "$libc" -F --filter='*' 2>/dev/null | grep -E '^__memmove_[a-z0-9_]+$' | grep -v '_chk' || true)
[ -n "$variants" ] || { echo "no memmove variants found in $libc" >&2; exit 1; }
work=$(mktemp -d /tmp/lb-copies.XXXXXX)
bench=
cleanup() {
  [ -n "$bench" ] && kill "$bench" 2>/dev/null
  perf probe -q -d 'probe_libc:*' 2>/dev/null || true
  perf probe -q -d 'probe_lbd:*' 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cleanup
mkdir -p "$work"
# One hit per request: clean_request_headers runs once for each. perf probe takes a file
# offset for a stripped-of-debug-info binary, so the symbol's address is turned into one.
addr=$(nm "$lbd" | awk '/clean_request_headers/{print $1}' | head -1)
[ -n "$addr" ] || { echo "no clean_request_headers symbol in $lbd (stripped, or inlined)" >&2; exit 1; }
off=$(readelf -lW "$lbd" | python3 -c '
import sys
a = int(sys.argv[1], 16)
for l in sys.stdin:
    f = l.split()
    if f and f[0] == "LOAD" and "E" in f[6:-1]:
        o, v, size = int(f[1], 16), int(f[2], 16), int(f[5], 16)
        if v <= a < v + size:
            print(hex(a - v + o))
' "$addr")
events=()
for v in $variants; do
  perf probe -q -x "$libc" "$v len=%dx:u64"
  events+=(-e "probe_libc:$v")
done
perf probe -q -x "$lbd" "$off"
per_request=$(perf probe -l 2>/dev/null | awk '/probe_lbd/{print $1}')
"$root/target/release/lb-bench" http --protocol http --rounds 1 --max-rounds 1 --seconds 5 \
  --out "$work/http.json" > "$work/bench.log" 2>&1 &
bench=$!
for _ in $(seq 600); do pgrep -f "wrk.*:8000/" >/dev/null && break; sleep 0.1; done
sleep 1
pid=$(pgrep -x lbd | head -1)
if [ -n "${SITES:-}" ]; then
  perf record -q "${events[@]}" -e "$per_request" -p "$pid" --call-graph dwarf,8192 \
    -o "$work/p.data" -- sleep 0.4 >/dev/null 2>&1
else
  perf record -q "${events[@]}" -e "$per_request" -p "$pid" -o "$work/p.data" -- sleep 1 >/dev/null 2>&1
fi
wait "$bench" || true
bench=
perf script -i "$work/p.data" -F event,trace,ip,sym 2>/dev/null > "$work/p.txt"
python3 - "$work/p.txt" <<'PY'
import collections, re, sys
text = open(sys.argv[1]).read()
records = text.split('\n\n') if '\n\n' in text else text.split('\n')
requests = calls = total = 0
sites = collections.Counter()
for r in records:
    first = r.strip().split('\n')[0] if r.strip() else ''
    if 'probe_lbd' in first:
        requests += 1
        continue
    m = re.search(r'len=(\d+)', first)
    if not m:
        continue
    n = int(m.group(1))
    calls += 1
    total += n
    frames = [l.strip().split(None, 1) for l in r.strip().split('\n')[1:]]
    caller = next((f[1][:90] for f in frames[1:3] if len(f) > 1), '?')
    sites[(caller, n)] += 1
per = max(requests, 1)
print(f"requests {requests}; memmove calls {calls / per:.1f} a request; bytes {total / per:,.0f} a request")
for (caller, n), k in sorted(sites.items(), key=lambda x: -x[1] * x[0][1])[:25]:
    if caller != '?':
        print(f"{k / per:5.2f} a request x {n:5d} B  {caller}")
PY
