# shellcheck shell=bash
# Shared helpers for the project's shell scripts; source it, don't run it.
# Kept dependency-free so it works on a machine that has nothing but bash.

# The repository root, whatever directory the caller was started from.
MESHD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export MESHD_ROOT

# Progress goes to stderr so a caller's stdout stays clean for data.
say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Seconds since the epoch with sub-second precision, for timing steps.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# wait_until DEADLINE_SECONDS DESCRIPTION CMD...: poll CMD until it succeeds.
# Polls instead of sleeping a fixed time so fast machines don't pay for slow ones.
wait_until() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
    printf '    %s: ready\n' "$what" >&2
}
