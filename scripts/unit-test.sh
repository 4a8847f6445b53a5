#!/usr/bin/env bash
# Checks that scripts/rollingpaper.service stays locked down: `systemd-analyze
# security` (offline, on the file itself) must score it 2.0 or lower, and the
# unit must not restart on a configuration error (exit 2). Skipped, saying so,
# where systemd-analyze is missing (containers without systemd).
set -euo pipefail
cd "$(dirname "$0")/.."

unit=scripts/rollingpaper.service
limit=2.0
status=0
grep -qx 'RestartPreventExitStatus=2' "$unit" || { echo "unit-test: $unit restarts on exit 2 (configuration errors)" >&2; status=1; }
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "unit-test: skipped the security score: systemd-analyze is not installed (Debian package systemd)"
    exit "$status"
fi
# --offline needs systemd 250 or later.
if ! report=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1); then
    echo "unit-test: skipped the security score: systemd-analyze could not score the file offline:" >&2
    echo "$report" | tail -3 >&2
    exit "$status"
fi
score=$(echo "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
    echo "unit-test: no score in systemd-analyze's report:" >&2; echo "$report" | tail -5 >&2; exit 1
fi
if awk -v s="$score" -v l="$limit" 'BEGIN { exit !(s <= l) }'; then
    echo "unit-test: $unit exposure $score (at most $limit)"
else
    echo "unit-test: $unit exposure $score is above $limit; what counts:" >&2
    echo "$report" | grep '✗' >&2
    status=1
fi
exit "$status"
