#!/usr/bin/env bash
# Make sure headless Chromium and its WebDriver are installed for the web admin's browser
# tests (tests/it/web_admin.rs): Debian's `chromium` and `chromium-driver`.
#
# Order:
#   1. /usr/bin/chromium and /usr/bin/chromedriver exist and run -> use them.
#   2. apt-get exists and we are root (or password-less sudo)
#      -> `apt-get update && apt-get install -y chromium chromium-driver`.
#   3. otherwise print what to do and exit 1 (the browser tests then fail: they never
#      pass silently without a browser).
#
# Prints one line on success (to stdout). Safe to run repeatedly, and safe to `source` (the
# work happens in a subshell; it returns the status instead of exiting your shell).

_warren_ensure_chromium() (
    set -euo pipefail

    say() { printf 'warren: %s\n' "$*"; }
    note() { printf 'warren: %s\n' "$*" >&2; }

    installed() {
        [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] &&
            /usr/bin/chromedriver --version >/dev/null 2>&1
    }

    can_root() {
        [[ "$(id -u)" == 0 ]] && return 0
        command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1
    }

    as_root() {
        if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo -n "$@"; fi
    }

    if installed; then
        say "Chromium and chromedriver installed ($(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f1-2))"
        exit 0
    fi

    if command -v apt-get >/dev/null 2>&1 && can_root; then
        log="$(mktemp -t warren-apt.XXXXXX.log)"
        note "installing chromium and chromium-driver with apt-get (log: $log)..."
        if as_root env DEBIAN_FRONTEND=noninteractive apt-get update >"$log" 2>&1 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver >>"$log" 2>&1; then
            rm -f -- "$log"
            if installed; then
                say "Chromium and chromedriver installed with apt-get"
                exit 0
            fi
            note "apt-get succeeded but /usr/bin/chromium or /usr/bin/chromedriver does not run."
            exit 1
        fi
        note "apt-get failed; last lines of $log:"
        tail -n 20 -- "$log" >&2 || true
        exit 1
    fi

    cat >&2 <<'MSG'
warren: Chromium and chromedriver are not installed and this script cannot install them.
  The web admin's browser tests (cargo test --test it web_admin::) need them:
    sudo apt-get install -y chromium chromium-driver
MSG
    exit 1
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    _warren_ensure_chromium
else
    if _warren_ensure_chromium; then
        unset -f _warren_ensure_chromium
        return 0
    else
        unset -f _warren_ensure_chromium
        return 1
    fi
fi
