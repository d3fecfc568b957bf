# Sourced by the scripts in benches/cluster/: what every one of them sets up.
# - the checkout's top as working dir; $bin, the roomd binary ($ROOMD_BIN, else $BIN, else
#   target/release/roomd, built if missing);
# - $work, a scratch dir, and every process started here (in $pids) killed on exit;
# - free_port; start_nats [monitor] (sets $nats_port and $nats_pid, and $nats_mon with
#   `monitor`);
# - start_node ID [FLAGS...]: a roomd on a free loopback port (port[ID], pid[ID]), data in
#   $work/ID, the bench limits raised; it returns once the node listens.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bin=${ROOMD_BIN:-${BIN:-target/release/roomd}}
[ -x "$bin" ] || cargo build --release --bin roomd
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid
# Flags every node gets: the benches offer more than the default per-client limits allow.
node_limits=(--op-rate 100000 --op-burst 100000)

start_nats() {
  nats_port=$(free_port)
  local monitor=()
  if [ "${1:-}" = monitor ]; then
    nats_mon=$(free_port)
    monitor=(-m "$nats_mon")
  fi
  "$nats" -a 127.0.0.1 -p "$nats_port" "${monitor[@]}" >/dev/null 2>&1 &
  nats_pid=$!
  pids+=("$nats_pid")
  sleep 0.5
}

start_node() {
  local id=$1; shift
  port[$id]=$(free_port)
  "$bin" --bind "127.0.0.1:${port[$id]}" --data-dir "$work/$id" "${node_limits[@]}" "$@" \
    >"$work/$id.out" 2>"$work/$id.err" &
  pid[$id]=$!
  pids+=("${pid[$id]}")
  for _ in $(seq 100); do grep -q listening "$work/$id.out" 2>/dev/null && break; sleep 0.1; done
}
