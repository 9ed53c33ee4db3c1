#!/usr/bin/env bash
# Resolve the README's two install commands against the public index only (no local mirror, no
# pip config), without installing or downloading wheels, and summarise what pip would install.
# Needs network access to PyPI; CI runs the offline check instead (tests/deploy/test_pins.py).
# Usage: bash constraints/dry_run_public_index.sh > constraints/public-index-dry-run.txt
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git -C "$root" archive HEAD | tar -x -C "$work" --one-top-level=src
python3 -m venv "$work/venv"
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT=
pip="$work/venv/bin/pip"
# pip >= 24 with fast-deps reads each wheel's metadata by HTTP range requests: no multi-GB download.
"$pip" install -q --index-url https://pypi.org/simple -U pip >&2
cd "$work/src"
echo "# pip install --dry-run --report of the README's quick start against https://pypi.org/simple"
echo "# $(date -u +%Y-%m-%d), $("$pip" --version | cut -d' ' -f1-2), Python $(python3 -c 'import sys; print(sys.version.split()[0])'), $(uname -m)"
for target in . '.[test]'; do
    "$pip" install -q --dry-run --ignore-installed --use-feature=fast-deps --index-url https://pypi.org/simple \
        --report "$work/report.json" torch==2.13.0 -e "$target" >&2
    echo
    echo "## pip install torch==2.13.0 -e '$target'"
    python3 - "$work/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print("\n".join(sorted("{name}=={version}".format(**i["metadata"]).lower() for i in report["install"])))
PY
done
