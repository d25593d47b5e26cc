#!/usr/bin/env bash
# Make sure a RabbitMQ broker is reachable for warren's tests and demo.
#
# Order:
#   1. WARREN_AMQP_URL is set and its host:port answers a TCP connect -> use it.
#   2. 127.0.0.1:5672 answers                                          -> use it.
#   3. rabbitmq-server is installed (and we are root, the rabbitmq user, or
#      have password-less sudo)  -> `rabbitmq-server -detached`, wait <= 60 s.
#   4. apt-get exists and we are root (or password-less sudo)
#      -> `apt-get update && apt-get install -y rabbitmq-server`, start, wait.
#   5. `docker compose` works -> `docker compose up -d rabbitmq`, wait.
#   6. otherwise print what to do and exit 1.
#
# Prints one line on success (to stdout). Never prints credentials.
# Safe to run repeatedly, and safe to `source` (the work happens in a subshell,
# so sourcing neither changes your shell options nor exits your shell; it
# returns the status instead).
#
# Knobs (mostly for testing this script):
#   WARREN_ENSURE_TIMEOUT     seconds to wait for a broker we started (default 60)
#   WARREN_ENSURE_LOCAL_HOST  local host to probe/start   (default 127.0.0.1)
#   WARREN_ENSURE_LOCAL_PORT  local port to probe/start   (default 5672)

# The body is a subshell function: `set -euo pipefail` and `exit` stay inside it.
_warren_ensure_rabbitmq() (
    set -euo pipefail

    local_host="${WARREN_ENSURE_LOCAL_HOST:-127.0.0.1}"
    local_port="${WARREN_ENSURE_LOCAL_PORT:-5672}"
    deadline_secs="${WARREN_ENSURE_TIMEOUT:-60}"
    repo_root="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"

    say() { printf 'warren: %s\n' "$*"; }
    note() { printf 'warren: %s\n' "$*" >&2; }

    # probe HOST PORT: true if a TCP connect succeeds within 2 s.
    probe() {
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
    }

    # wait_port HOST PORT SECS: poll until the port answers or the deadline passes.
    wait_port() {
        local host=$1 port=$2 secs=$3 start=$SECONDS
        while ((SECONDS - start < secs)); do
            if probe "$host" "$port"; then
                return 0
            fi
            sleep 0.5
        done
        probe "$host" "$port"
    }

    # parse_url URL: prints "HOST PORT" (no credentials) for an amqp(s) URL.
    parse_url() {
        local url=$1 scheme rest hostport host port
        scheme="${url%%://*}"
        if [[ "$scheme" == "$url" ]]; then
            scheme=amqp
            rest=$url
        else
            rest="${url#*://}"
        fi
        rest="${rest%%/*}"     # drop /vhost
        rest="${rest%%\?*}"    # drop ?query
        hostport="${rest##*@}" # drop user:pass@
        if [[ "$hostport" == \[* ]]; then
            # [ipv6]:port
            host="${hostport%%]*}"
            host="${host#[}"
            port="${hostport#*]}"
            port="${port#:}"
        elif [[ "$hostport" == *:* ]]; then
            host="${hostport%%:*}"
            port="${hostport##*:}"
        else
            host=$hostport
            port=
        fi
        if [[ -z "$port" ]]; then
            if [[ "$scheme" == amqps ]]; then port=5671; else port=5672; fi
        fi
        [[ -n "$host" ]] || host=localhost
        printf '%s %s\n' "$host" "$port"
    }

    can_root() {
        [[ "$(id -u)" == 0 ]] && return 0
        command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1
    }

    as_root() {
        if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo -n "$@"; fi
    }

    find_server() {
        local p
        for p in "$(command -v rabbitmq-server 2>/dev/null || true)" \
            /usr/sbin/rabbitmq-server /usr/local/sbin/rabbitmq-server; do
            if [[ -n "$p" && -x "$p" ]]; then
                printf '%s\n' "$p"
                return 0
            fi
        done
        return 1
    }

    # start_server PATH: start an installed broker detached and wait for the port.
    start_server() {
        local server=$1 log
        log="$(mktemp -t warren-rabbitmq-start.XXXXXX.log)"
        note "starting RabbitMQ ($server -detached), waiting up to ${deadline_secs}s..."
        if [[ "$(id -u)" == 0 ]] || [[ "$(id -un)" == rabbitmq ]]; then
            "$server" -detached >"$log" 2>&1 || true
        else
            sudo -n "$server" -detached >"$log" 2>&1 || true
        fi
        if wait_port "$local_host" "$local_port" "$deadline_secs"; then
            rm -f -- "$log"
            return 0
        fi
        note "RabbitMQ did not answer on $local_host:$local_port within ${deadline_secs}s."
        note "start-up output ($log):"
        tail -n 20 -- "$log" >&2 || true
        note "broker logs are usually in /var/log/rabbitmq/."
        return 1
    }

    # 1. WARREN_AMQP_URL
    if [[ -n "${WARREN_AMQP_URL:-}" ]]; then
        read -r url_host url_port < <(parse_url "$WARREN_AMQP_URL")
        if probe "$url_host" "$url_port"; then
            say "RabbitMQ reachable at $url_host:$url_port (WARREN_AMQP_URL)"
            exit 0
        fi
        note "warning: WARREN_AMQP_URL points at $url_host:$url_port, which does not answer;" \
            "trying a local broker (anything reading WARREN_AMQP_URL still uses $url_host:$url_port)."
    fi

    # 2. local broker already up
    if probe "$local_host" "$local_port"; then
        say "RabbitMQ reachable at $local_host:$local_port"
        exit 0
    fi

    # 3. installed but not running
    if server="$(find_server)"; then
        if can_root || [[ "$(id -un)" == rabbitmq ]]; then
            if start_server "$server"; then
                say "RabbitMQ reachable at $local_host:$local_port (started $server)"
                exit 0
            fi
            exit 1
        fi
        note "rabbitmq-server is installed but not running, and starting it needs root" \
            "(or password-less sudo); trying other options."
    fi

    # 4. install with apt-get
    if command -v apt-get >/dev/null 2>&1 && can_root; then
        log="$(mktemp -t warren-apt.XXXXXX.log)"
        note "installing rabbitmq-server with apt-get (log: $log)..."
        if as_root env DEBIAN_FRONTEND=noninteractive apt-get update >"$log" 2>&1 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >>"$log" 2>&1; then
            rm -f -- "$log"
            # The package may already have started the service.
            if wait_port "$local_host" "$local_port" 5; then
                say "RabbitMQ reachable at $local_host:$local_port (installed with apt-get)"
                exit 0
            fi
            if server="$(find_server)" && start_server "$server"; then
                say "RabbitMQ reachable at $local_host:$local_port (installed with apt-get)"
                exit 0
            fi
            exit 1
        fi
        note "apt-get failed; last lines of $log:"
        tail -n 20 -- "$log" >&2 || true
    fi

    # 5. docker compose
    if command -v docker >/dev/null 2>&1 &&
        docker compose version >/dev/null 2>&1 &&
        docker info >/dev/null 2>&1 &&
        [[ -f "$repo_root/docker-compose.yml" ]]; then
        note "starting RabbitMQ with docker compose (service rabbitmq)..."
        if (cd -- "$repo_root" && docker compose up -d rabbitmq) >&2; then
            if wait_port "$local_host" "$local_port" "$deadline_secs"; then
                say "RabbitMQ reachable at $local_host:$local_port (docker compose)"
                exit 0
            fi
            note "the rabbitmq container did not answer on $local_host:$local_port within ${deadline_secs}s;" \
                "see: docker compose logs rabbitmq"
        fi
        exit 1
    fi

    # 6. nothing worked
    cat >&2 <<EOF
warren: no RabbitMQ is reachable and this script could not start one.
  Do one of these, then run the command again:
    * install and start it:  sudo apt-get install -y rabbitmq-server
                             (then: sudo rabbitmq-server -detached, or sudo systemctl start rabbitmq-server)
    * with Docker:           docker compose up -d rabbitmq     (from $repo_root)
    * point warren at a broker you already have:
                             export WARREN_AMQP_URL=amqp://USER:PASS@HOST:5672/%2f
EOF
    exit 1
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    # Run as a program.
    set -euo pipefail
    _warren_ensure_rabbitmq
else
    # Sourced: report the status without exiting (or tripping `set -e` in) the caller.
    if _warren_ensure_rabbitmq; then
        unset -f _warren_ensure_rabbitmq
        return 0
    else
        unset -f _warren_ensure_rabbitmq
        return 1
    fi
fi
