#!/usr/bin/env bash
# Checks the documentation as a plain clone has it: every relative link of
# every Markdown file resolves to a file or folder of the repository (and a
# `#anchor` to a heading of it), and docs/PROTOCOL.md is identical to the
# contract shared beside the repository (../shared/PROTOCOL.md), when there is
# one, so that the two never drift.
set -euo pipefail
cd "$(dirname "$0")/.."

failures=0
fail() { echo "doc-check: $*" >&2; failures=$((failures + 1)); }

# GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes.
anchors() {
    grep -E '^#{1,6} ' "$1" | sed -E 's/^#+ +//' | tr '[:upper:]' '[:lower:]' \
        | sed -E 's/[^a-z0-9 _-]//g; s/ /-/g'
}

checked=0
while IFS= read -r -d '' file; do
    dir=$(dirname "$file")
    # [text](target) with a relative target; code spans are left out.
    while IFS= read -r target; do
        checked=$((checked + 1))
        path="${target%%#*}"
        anchor=""
        [[ "$target" == *#* ]] && anchor="${target#*#}"
        if [ -z "$path" ]; then
            resolved="$file"
        else
            resolved="$dir/$path"
        fi
        if [ ! -e "$resolved" ]; then
            fail "$file links to $target, which does not exist"
            continue
        fi
        if [ -n "$anchor" ] && [[ "$resolved" == *.md ]] && ! anchors "$resolved" | grep -qx -- "$anchor"; then
            fail "$file links to $target: $resolved has no heading #$anchor"
        fi
    done < <(sed -E 's/`[^`]*`//g' "$file" | grep -oE '\]\([^)[:space:]]+\)' | sed -E 's/^\]\((.*)\)$/\1/' \
        | grep -vE '^(https?|mailto|ftp|ws|wss):' || true)
done < <(find . -name '*.md' -not -path './target/*' -not -path '*/node_modules/*' -not -path './.git/*' -print0)

shared=../shared/PROTOCOL.md
contract="docs/PROTOCOL.md is the shared contract"
if [ -f "$shared" ]; then
    cmp -s docs/PROTOCOL.md "$shared" || fail "docs/PROTOCOL.md differs from $shared: copy the contract over, never edit the copy"
else
    contract="no $shared beside the repository to compare docs/PROTOCOL.md with"
fi

if ((failures)); then
    echo "doc-check: $failures problem(s) in $checked links" >&2
    exit 1
fi
echo "doc-check: $checked relative links resolve; $contract"
