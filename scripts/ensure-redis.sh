#!/usr/bin/env bash
# Make sure a Redis server is reachable for warren's tests (the status-store tests).
#
# Order:
#   1. WARREN_REDIS_URL is set and its host:port answers a Redis PING -> use it.
#   2. 127.0.0.1:6379 answers a PING                                  -> use it.
#   3. redis-server is installed -> `redis-server --daemonize yes` on 127.0.0.1:6379
#      (no persistence, working folder and log in a temp folder), wait <= 60 s.
#   4. apt-get exists and we are root (or password-less sudo)
#      -> `apt-get update && apt-get install -y redis-server`, start, wait.
#   5. `docker compose` works -> `docker compose up -d redis`, wait.
#   6. otherwise print what to do and exit 1.
#
# "Answers" means a Redis reply to PING on a TCP connection (+PONG, or -NOAUTH from a
# server that wants a password), not only an open port.
#
# Prints one line on success (to stdout). Never prints credentials.
# Safe to run repeatedly, and safe to `source` (the work happens in a subshell,
# so sourcing neither changes your shell options nor exits your shell; it
# returns the status instead).
#
# Knobs (mostly for testing this script):
#   WARREN_ENSURE_TIMEOUT           seconds to wait for a server we started (default 60)
#   WARREN_ENSURE_REDIS_LOCAL_HOST  local host to probe/start   (default 127.0.0.1)
#   WARREN_ENSURE_REDIS_LOCAL_PORT  local port to probe/start   (default 6379)

# The body is a subshell function: `set -euo pipefail` and `exit` stay inside it.
_warren_ensure_redis() (
    set -euo pipefail

    local_host="${WARREN_ENSURE_REDIS_LOCAL_HOST:-127.0.0.1}"
    local_port="${WARREN_ENSURE_REDIS_LOCAL_PORT:-6379}"
    deadline_secs="${WARREN_ENSURE_TIMEOUT:-60}"
    repo_root="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"

    say() { printf 'warren: %s\n' "$*"; }
    note() { printf 'warren: %s\n' "$*" >&2; }

    # probe HOST PORT: true if a Redis on HOST:PORT answers PING within 2 s.
    probe() {
        timeout 2 bash -c '
            exec 3<>"/dev/tcp/$1/$2" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r reply <&3 || exit 1
            [[ "$reply" == "+PONG"* || "$reply" == "-NOAUTH"* ]]
        ' _ "$1" "$2" >/dev/null 2>&1
    }

    # wait_port HOST PORT SECS: poll until a Redis answers or the deadline passes.
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

    # parse_url URL: prints "HOST PORT" (no credentials) for a redis(s) URL.
    parse_url() {
        local url=$1 rest hostport host port
        if [[ "$url" == *://* ]]; then
            rest="${url#*://}"
        else
            rest=$url
        fi
        rest="${rest%%/*}"     # drop /db
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
        [[ -n "$port" ]] || port=6379
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
        for p in "$(command -v redis-server 2>/dev/null || true)" \
            /usr/bin/redis-server /usr/local/bin/redis-server /usr/sbin/redis-server; do
            if [[ -n "$p" && -x "$p" ]]; then
                printf '%s\n' "$p"
                return 0
            fi
        done
        return 1
    }

    # start_server PATH: start an installed redis-server as a daemon and wait for it.
    # It needs no root: it runs as the current user, keeps nothing on disk (no RDB
    # snapshots, no AOF) and keeps its log and pid file in a temp folder.
    start_server() {
        local server=$1 dir
        dir="$(mktemp -d -t warren-redis.XXXXXX)"
        note "starting Redis ($server --daemonize yes on $local_host:$local_port, files in $dir)," \
            "waiting up to ${deadline_secs}s..."
        "$server" --daemonize yes \
            --bind "$local_host" --port "$local_port" \
            --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" \
            --save '' --appendonly no \
            >"$dir/start.log" 2>&1 || true
        if wait_port "$local_host" "$local_port" "$deadline_secs"; then
            return 0
        fi
        note "Redis did not answer on $local_host:$local_port within ${deadline_secs}s."
        note "start-up output ($dir/start.log, $dir/redis.log):"
        tail -n 20 -- "$dir/start.log" "$dir/redis.log" >&2 || true
        return 1
    }

    # 1. WARREN_REDIS_URL
    if [[ -n "${WARREN_REDIS_URL:-}" ]]; then
        read -r url_host url_port < <(parse_url "$WARREN_REDIS_URL")
        if probe "$url_host" "$url_port"; then
            say "Redis reachable at $url_host:$url_port (WARREN_REDIS_URL)"
            exit 0
        fi
        note "warning: WARREN_REDIS_URL points at $url_host:$url_port, which does not answer;" \
            "trying a local Redis (anything reading WARREN_REDIS_URL still uses $url_host:$url_port)."
    fi

    # 2. local server already up
    if probe "$local_host" "$local_port"; then
        say "Redis reachable at $local_host:$local_port"
        exit 0
    fi

    # 3. installed but not running
    if server="$(find_server)"; then
        if start_server "$server"; then
            say "Redis reachable at $local_host:$local_port (started $server)"
            exit 0
        fi
        exit 1
    fi

    # 4. install with apt-get
    if command -v apt-get >/dev/null 2>&1 && can_root; then
        log="$(mktemp -t warren-apt.XXXXXX.log)"
        note "installing redis-server with apt-get (log: $log)..."
        if as_root env DEBIAN_FRONTEND=noninteractive apt-get update >"$log" 2>&1 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >>"$log" 2>&1; then
            rm -f -- "$log"
            # The package may already have started the service.
            if wait_port "$local_host" "$local_port" 5; then
                say "Redis reachable at $local_host:$local_port (installed with apt-get)"
                exit 0
            fi
            if server="$(find_server)" && start_server "$server"; then
                say "Redis reachable at $local_host:$local_port (installed with apt-get)"
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
        note "starting Redis with docker compose (service redis)..."
        if (cd -- "$repo_root" && docker compose up -d redis) >&2; then
            if wait_port "$local_host" "$local_port" "$deadline_secs"; then
                say "Redis reachable at $local_host:$local_port (docker compose)"
                exit 0
            fi
            note "the redis container did not answer on $local_host:$local_port within ${deadline_secs}s;" \
                "see: docker compose logs redis"
        fi
        exit 1
    fi

    # 6. nothing worked
    cat >&2 <<EOF
warren: no Redis is reachable and this script could not start one.
  Do one of these, then run the command again:
    * install and start it:  sudo apt-get install -y redis-server
                             (then: redis-server --daemonize yes, or sudo systemctl start redis-server)
    * with Docker:           docker compose up -d redis     (from $repo_root)
    * point warren's tests at a Redis you already have:
                             export WARREN_REDIS_URL=redis://HOST:6379/
EOF
    exit 1
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    # Run as a program.
    set -euo pipefail
    _warren_ensure_redis
else
    # Sourced: report the status without exiting (or tripping `set -e` in) the caller.
    if _warren_ensure_redis; then
        unset -f _warren_ensure_redis
        return 0
    else
        unset -f _warren_ensure_redis
        return 1
    fi
fi
