#!/usr/bin/env bash
# A real tunnel on loopback, from a fresh machine: install, make two identities, start two
# gateways (edge dials hub over mutual TLS 1.3), serve a web page behind hub, fetch it
# through the tunnel with curl, then stop both gateways with SIGTERM (they drain and exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e .
command -v curl >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq curl >/dev/null; }

demo=$(mktemp -d /tmp/tunnelgate-demo.XXXXXX)
tg() { .venv/bin/python -m gateway "$@"; }
tg keygen "$demo/hub" >/dev/null
tg keygen "$demo/edge" >/dev/null
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CARRIER=$(port); WEB=$(port)

cat > "$demo/hub.toml" <<TOML
[gateway]
name = "hub"
key = "hub.key"
listen = ["tls://127.0.0.1:$CARRIER"]

[[peer]]
name = "edge"
cert = "edge.crt"
allow = ["tcp://127.0.0.1:$WEB"]     # the only thing edge may reach through hub
TOML
cat > "$demo/edge.toml" <<TOML
[gateway]
name = "edge"
key = "edge.key"

[[peer]]
name = "hub"
cert = "hub.crt"
dial = "tls://127.0.0.1:$CARRIER"

[[tunnel]]
name = "web"
listen = "tcp://127.0.0.1:0"        # 0: any free port; the ready file says which
via = ["hub"]
target = "127.0.0.1:$WEB"
TOML

echo "hello through tunnelgate" > "$demo/index.html"
.venv/bin/python -m http.server "$WEB" --bind 127.0.0.1 --directory "$demo" >/dev/null 2>&1 &
web_pid=$!
.venv/bin/python -m gateway run "$demo/hub.toml" --ready-file "$demo/hub.ready" 2>"$demo/hub.log" &
hub_pid=$!
.venv/bin/python -m gateway run "$demo/edge.toml" --ready-file "$demo/edge.ready" 2>"$demo/edge.log" &
edge_pid=$!
cleanup() { kill -TERM "$edge_pid" "$hub_pid" 2>/dev/null; wait "$edge_pid" "$hub_pid" 2>/dev/null || true; kill "$web_pid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 100); do [ -f "$demo/edge.ready" ] && grep -q "up (peer hub)" "$demo/edge.log" && break; sleep 0.1; done
LISTEN=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["tunnels"]["web"][1])' "$demo/edge.ready")
echo "tunnel 'web' listens on 127.0.0.1:$LISTEN -> edge ==TLS 1.3==> hub -> 127.0.0.1:$WEB"
echo "curl http://127.0.0.1:$LISTEN/ says:"
curl -sS --max-time 10 "http://127.0.0.1:$LISTEN/"
cleanup
trap - EXIT
echo "--- edge log ---"; cat "$demo/edge.log"
echo "--- hub log ---"; cat "$demo/hub.log"
echo "(configs, keys and logs are in $demo)"
