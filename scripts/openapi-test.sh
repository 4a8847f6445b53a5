#!/usr/bin/env bash
# Checks src/web/openapi.json, the backend API's OpenAPI document (PROTOCOL.md 7;
# the server serves it at GET /api/openapi.json):
#   - it is valid OpenAPI 3.1 for openapi-spec-validator (PyPI), installed with
#     pip in a virtualenv of its own, target/openapi-venv (reused on later runs);
#   - it describes exactly the routes of PROTOCOL.md section 7, a HEAD beside
#     each GET, `Retry-After` on every 503, and info.version is the protocol's;
#   - the validator can fail: broken copies of the document (an undeclared path
#     parameter, a dangling $ref, a 3.0 document checked as 3.1) must be refused.
# Needs python3 with venv (Debian: python3-venv; scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

doc=src/web/openapi.json
venv=target/openapi-venv
# Raise deliberately (pip index versions openapi-spec-validator), then run this script.
validator=openapi-spec-validator==0.9.0

python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || {
    echo "openapi-test: python3's venv is missing (Debian package python3-venv)" >&2
    exit 1
}
"$venv/bin/python" -c '' >/dev/null 2>&1 || { rm -rf "$venv"; python3 -m venv "$venv"; }
py=$venv/bin/python
if [ "$("$py" -m pip show openapi-spec-validator 2>/dev/null | sed -n 's/^Version: //p')" != "${validator#*==}" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check "$validator"
fi
validate() { "$py" -m openapi_spec_validator --schema 3.1 "$1"; }

status=0
echo "openapi-test: $("$py" -m openapi_spec_validator --version), --schema 3.1"
validate "$doc" || status=1

# The routes of PROTOCOL.md section 7, against the document's operations.
"$py" - "$doc" docs/PROTOCOL.md <<'PY' || status=1
import json, re, sys

doc = json.load(open(sys.argv[1]))
protocol = open(sys.argv[2]).read()
problems = []

version = re.search(r"^# .*, version (\S+)$", protocol, re.M).group(1)
if doc["info"]["version"] != version:
    problems.append(f"info.version is {doc['info']['version']!r}, PROTOCOL.md is {version!r}")

section = protocol.split("\n## 7.", 1)[1].split("\n## ", 1)[0]
routes = set(re.findall(r"^\| `(GET|HEAD|PUT|PATCH|POST|DELETE) (/api/[^ `]+)", section, re.M))
methods = {"get", "head", "put", "patch", "post", "delete", "options", "trace"}
described = {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in methods}
for method, path in sorted(routes - described):
    problems.append(f"{method} {path} is in PROTOCOL.md section 7 but not in the document")
for method, path in sorted(described - routes):
    if method == "HEAD" and ("GET", path) in described:
        continue
    problems.append(f"{method} {path} is in the document but not in PROTOCOL.md section 7")
for method, path in sorted(described):
    if method == "GET" and ("HEAD", path) not in described:
        problems.append(f"GET {path} has no HEAD (PROTOCOL.md 1: HEAD answers what GET would)")

for path, item in doc["paths"].items():
    for method, op in item.items():
        if method not in methods:
            continue
        answer = op["responses"].get("503")
        if answer is None:
            continue
        if "$ref" in answer:
            name = answer["$ref"].rsplit("/", 1)[1]
            answer = doc["components"]["responses"][name]
        if "Retry-After" not in answer.get("headers", {}):
            problems.append(f"{method.upper()} {path}: 503 without Retry-After")

for p in problems:
    print(f"openapi-test: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"openapi-test: the {len(routes)} routes of PROTOCOL.md section 7 are described")
PY

# The validator must refuse broken copies; each is checked as 3.1 like the real one.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" - "$doc" "$work" <<'PY'
import copy, json, sys

doc = json.load(open(sys.argv[1]))
out = sys.argv[2]
def broken(name, change):
    d = copy.deepcopy(doc)
    change(d)
    json.dump(d, open(f"{out}/{name}.json", "w"))
broken("undeclared-path-parameter", lambda d: d["paths"]["/api/papers/{paper}/meta"].pop("parameters"))
broken("dangling-ref", lambda d: d["components"]["responses"]["Written"]["content"]["application/json"]["schema"]
       .update({"$ref": "#/components/schemas/Missing"}))
broken("openapi-3.0", lambda d: d.update(openapi="3.0.3"))
PY
for copy in "$work"/*.json; do
    if validate "$copy" >"$work/out" 2>&1; then
        echo "openapi-test: the validator accepted a broken copy ($(basename "$copy" .json)):" >&2
        head -5 "$work/out" >&2
        status=1
    else
        echo "openapi-test: refused, as it must: $(basename "$copy" .json)"
    fi
done

if [ "$status" -eq 0 ]; then echo "openapi-test: passed"; else echo "openapi-test: FAILED" >&2; fi
exit "$status"
