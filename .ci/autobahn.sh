#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzing client against roomd's echo route
# (`--enable-echo`, /ws/echo on 127.0.0.1:9001) and exits with summarize.py's status, so any
# failing case fails the job. Groups 9, 12 and 13 are left out by fuzzingclient.json.
#
# Usage: .ci/autobahn.sh [ROOMD_BINARY]        (default: target/release/roomd)
# AUTOBAHN_DIR: where wstest is installed, and reused from (default ~/.cache/roomd-autobahn).
# On failure the reports and the server's output are kept; their path is printed.
set -euo pipefail

repo_root=$(git rev-parse --show-toplevel)
cd "$repo_root"

roomd=${1:-target/release/roomd}
[ -x "$roomd" ] || { echo "autobahn: no roomd binary at $roomd (cargo build --release)" >&2; exit 2; }
roomd=$(realpath "$roomd")
autobahn_dir=${AUTOBAHN_DIR:-$HOME/.cache/roomd-autobahn}

# CI checks out shared/tools next to the repository; a dev machine has it under /work/shared.
tools="$repo_root/../shared/tools/autobahn"
[ -f "$tools/setup_wstest.sh" ] || tools=/work/shared/tools/autobahn
[ -f "$tools/setup_wstest.sh" ] || { echo "autobahn: tools not found" >&2; exit 2; }
tools=$(cd "$tools" && pwd)

if [ ! -x "$autobahn_dir/wstest" ]; then
  echo "autobahn: installing wstest into $autobahn_dir"
  # The setup script ends with `wstest --help | head -3` under pipefail, which fails
  # now and then with a broken pipe once head has its lines. What matters is that
  # wstest was installed and runs, so check that instead of the script's status.
  bash "$tools/setup_wstest.sh" "$autobahn_dir" || true
  "$autobahn_dir/wstest" --help >/dev/null 2>&1 \
    || { echo "autobahn: wstest did not install into $autobahn_dir" >&2; exit 1; }
fi

# fuzzingclient.json names this address; a leftover server there would be tested instead.
if (exec 3<>/dev/tcp/127.0.0.1/9001) 2>/dev/null; then
  echo "autobahn: 127.0.0.1:9001 is already in use" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/roomd-autobahn.XXXXXX")
server_pid=""
cleanup() {
  local status=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    # Graceful shutdown gets 10 s; after that the server is killed outright.
    for _ in $(seq 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$status" -eq 0 ]; then
    rm -rf "$work"
  else
    echo "autobahn: reports and server output kept in $work" >&2
  fi
}
trap cleanup EXIT

mkdir "$work/data"
"$roomd" serve --bind 127.0.0.1:9001 --data-dir "$work/data" --enable-echo \
  >"$work/roomd.stdout" 2>"$work/roomd.stderr" &
server_pid=$!

deadline=$((SECONDS + 30))
until grep -q 'roomd listening on' "$work/roomd.stdout"; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "autobahn: roomd exited before listening; its stderr:" >&2
    cat "$work/roomd.stderr" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "autobahn: roomd did not print 'roomd listening on' within 30 s" >&2
    exit 1
  fi
  sleep 0.1
done

cp "$tools/fuzzingclient.json" "$work/"
(cd "$work" && "$autobahn_dir/wstest" -m fuzzingclient -s fuzzingclient.json)

summary_status=0
(cd "$work" && python3 "$tools/summarize.py" reports/index.json) || summary_status=$?
exit "$summary_status"
