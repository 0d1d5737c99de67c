#!/usr/bin/env bash
# Start-up time with many interfaces: a throwaway netns with N veth pairs (both ends inside,
# up), then the time from starting `fwmark-trace trace` until it says "tracing (", and how many
# lines it printed before that. Usage (as root): scripts/startup-time.sh [PAIRS] [BINARY]
set -euo pipefail
pairs=${1:-200}
bin=${2:-target/release/fwmark-trace}
ns=fwmt-startup-$$
out=$(mktemp /tmp/fwmt-startup-XXXXXX)
err=$(mktemp /tmp/fwmt-startup-err-XXXXXX)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    ip netns del "$ns" 2>/dev/null || true
    rm -f "$out" "$err"
}
trap cleanup EXIT

ip netns add "$ns"
{
    for i in $(seq 1 "$pairs"); do echo "link add va$i type veth peer name vb$i"; done
    echo "link set lo up"
    for i in $(seq 1 "$pairs"); do echo "link set va$i up"; echo "link set vb$i up"; done
} | ip -n "$ns" -batch -
echo "netns $ns: $(ip -n "$ns" -o link | wc -l) interfaces"

start=$(date +%s.%N)
"$bin" trace --netns "$ns" --json --output "$out" --duration 5s 2>"$err" &
pid=$!
until grep -q "tracing (" "$err"; do
    if ! kill -0 "$pid" 2>/dev/null; then cat "$err"; echo "fwmark-trace exited early"; exit 1; fi
    sleep 0.02
done
ready=$(date +%s.%N)
lines=$(grep -c . "$err")
echo "tracing after $(echo "$ready - $start" | bc) s, $lines start-up lines:"
sed 's/^/    /' "$err"
# CPU while running idle (the per-second interface refresh dominates): utime+stime over 3 s.
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
t0=$(cpu); sleep 3; t1=$(cpu)
echo "while running: $(( (t1 - t0) * 1000 / $(getconf CLK_TCK) / 3 )) ms CPU per second"
wait "$pid" || true
pid=
