#!/usr/bin/env bash
# Runs one fuzz target for a time box (under nice, as the machine is shared) and appends
# libFuzzer's final stats to runs.tsv: end time, target, seconds, executions, exec/s, new
# corpus units, peak RSS, load average at the end, outcome. Usage: ./run.sh TARGET SECONDS
# (after `RUSTC_BOOTSTRAP=1 cargo fuzz build -s none -a`; see README.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
t=$1
secs=$2
bin=target/x86_64-unknown-linux-gnu/release/$t
mkdir -p "work/$t" "artifacts/$t" logs
dirs=("work/$t" "corpus/$t")
[ -d "regressions/$t" ] && dirs+=("regressions/$t")
log=logs/$t-$(date +%H%M%S).log
nice -n 10 "$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
    -timeout=10 -max_len=4096 -artifact_prefix="artifacts/$t/" "${dirs[@]}" >"$log" 2>&1
rc=$?
stat() { grep -m1 "stat::$1:" "$log" | awk '{print $2}'; }
outcome=ok
[ "$rc" -ne 0 ] && outcome="crash(rc=$rc):$(grep -m1 -oE 'artifacts/[^ ]+' "$log" | tail -1)"
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%H:%M:%S)" "$t" "$secs" \
    "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" "$(stat new_units_added)" \
    "$(stat peak_rss_mb)" "$(cut -d' ' -f1 /proc/loadavg)" "$outcome" >>runs.tsv
tail -1 runs.tsv
