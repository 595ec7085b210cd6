#!/usr/bin/env bash
# The reliability suite, with its figures: what docs/reliability.md reports.
#
#   scripts/reliability.sh          the quick part, as CI runs it (about 1.5 minutes on 2 cores)
#   scripts/reliability.sh --soak   the quick part, then the long soak (about 4 more minutes)
#
# Environment (optional):
#   SOAK_GENERATIONS   generations per long soak run (default 2000, at least 1000); the long
#                      soak runs twice, with MALLOC_ARENA_MAX=2 and with glibc's default
#   RELIABILITY_REPORT where the figures go as JSON (default build/reliability.json)
#
# Every load loop is bounded in count and time and talks to 127.0.0.1 only. The figures are
# printed at the end as the Markdown table that docs/reliability.md holds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

soak=0
case "${1:-}" in
    --soak) soak=1 ;;
    "") ;;
    *) echo "usage: $0 [--soak]" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1
export RELIABILITY_REPORT=${RELIABILITY_REPORT:-build/reliability.json}
mkdir -p "$(dirname "$RELIABILITY_REPORT")"
rm -f "$RELIABILITY_REPORT"

start=$SECONDS
uv run pytest tests/reliability -p no:cacheprovider
echo "quick part: $((SECONDS - start)) s"
if ((soak)); then
    soak_start=$SECONDS
    uv run pytest tests/reliability -m soak -p no:cacheprovider
    echo "long soak: $((SECONDS - soak_start)) s"
fi

echo
uv run python -m tests.reliability.figures "$RELIABILITY_REPORT"
