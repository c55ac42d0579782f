#!/usr/bin/env bash
# Runs every benchmark in turn and keeps each JSON document in bench/results/.
# Usage: bench/run_all.sh [--database-url URL]   (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
py=.venv/bin/python
run() { local name=$1; shift; echo "== $name" >&2; "$py" "bench/$name.py" "$@" > "bench/results/$name.json"; cat "bench/results/$name.json"; }
run step_overhead --steps 2000 --runs 5 "$@"
run journal_write --writes 2000 --runs 3   # SQLite only
run sqlite_writers --processes 1,2,4,8,16 --runs 3 --writers process,machine   # SQLite only, no Ray
run tracing_overhead --steps 2000 --runs 7 "$@"
run replay --steps 10000 --runs 7 "$@"
run throughput --creates 10000 --workflows 300 --one-by-one 200 --runs 3 "$@"
run fairness --flood 10000 --samples 40 "$@"
run activation --warm 50 --cold 10 "$@"
run sandbox --spawns 60 --samples 20 "$@"
run sandbox_activation --activations 3000 --rounds 3   # no journal
run timers --instances 10000 "$@"
run tenants --samples 20 --tenants 100000 "$@"
run steady --rate 100 --tenants 3 --warmup 30 --seconds 300 "$@"
run http_api --creates 1000 --clients 8 --runs 3 "$@"
run sustained --minutes 5 --warmup 30 --backlog 1000 "$@"
