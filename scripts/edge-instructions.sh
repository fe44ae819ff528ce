#!/usr/bin/env bash
# Instructions (user space) per proxied request (HTTP/1.1 unless told) in lbd, counted by callgrind: a
# figure that does not move with the shared host's load, unlike requests/s. Runs the HTTP
# benchmark's lb leg with lbd under `valgrind --tool=callgrind`, counts only while wrk runs,
# and divides by the requests (calls of `clean_request_headers`, once per request).
#
#   cargo build --release --bins && scripts/edge-instructions.sh [seconds]
#
# PROTOCOL=https or PROTOCOL=h2 counts that leg instead (h2load for HTTP/2); KEEP=DIR keeps
# the callgrind profile.
#
# Needs valgrind (Debian package) beside what `cargo xtask bench http` installs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-5}
protocol=${PROTOCOL:-http}
case $protocol in
  http) client='wrk.*http://' ;;
  https) client='wrk.*https://' ;;
  h2) client='h2load.*https://' ;;
  *) echo "PROTOCOL must be http, https or h2" >&2; exit 2 ;;
esac
work=$(mktemp -d /tmp/lb-callgrind.XXXXXX)
trap 'rm -rf "$work"' EXIT
# lb-bench runs the lbd beside it: a wrapper that runs the real one under callgrind,
# instrumenting nothing until told to.
cp "$root/target/release/lb-bench" "$work/"
cat > "$work/lbd" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$work/cg.out.%p \
  $root/target/release/lbd "\$@" 2>>$work/valgrind.log
WRAP
chmod +x "$work/lbd"
"$work/lb-bench" http --protocol "$protocol" --rounds 1 --seconds "$secs" --out "$work/http.json" > "$work/bench.log" 2>&1 &
bench=$!
for _ in $(seq 600); do pgrep -f "$client" >/dev/null && break; sleep 0.05; done
callgrind_control -i on >/dev/null 2>&1
while pgrep -f "$client" >/dev/null; do sleep 0.05; done
callgrind_control -d >/dev/null 2>&1
callgrind_control -i off >/dev/null 2>&1
wait "$bench" || true
out=$(ls "$work"/cg.out.*.1 | head -1)
callgrind_annotate --tree=caller "$out" > "$work/tree.txt"
# KEEP=DIR keeps the profile and its annotation for reading.
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$out" "$work/tree.txt" "$KEEP/"; fi
python3 - "$work/tree.txt" <<'PY'
import re, sys
tree = open(sys.argv[1]).read()
total = int(re.search(r'([\d,]+) \(100.0%\)\s+PROGRAM TOTALS', tree).group(1).replace(',', ''))
calls = 0
for block in tree.split('\n\n'):
    if re.search(r'\*\s+\?\?\?:lb_userspace::edge::proxy::clean_request_headers', block):
        calls += sum(int(m.group(1).replace(',', '')) for m in re.finditer(r'<.*\(([\d,]+)x\)', block))
print(f"instructions {total:,}; requests {calls:,}; per request {total / max(calls, 1):,.0f}")
PY
