#!/usr/bin/env bash
# The daily report: check that the deployed API serves its CSV export, run
# `qf report --api … --out DIR --readme README`, then (when asked) commit the README and the
# images, only if they changed, and push. Run by .github/workflows/report.yml; tests/
# test_workflow_scripts.py runs it against a real `qf api` and a local git remote.
#
# Settings (environment; the token is never printed):
#   QUANTUMFLOW_API_URL        the deployed API's base URL, e.g. https://quantumflow.fly.dev (required)
#   QUANTUMFLOW_API_TOKEN      bearer token for the API (QF_API_TOKEN where it runs; empty: none sent)
#   QUANTUMFLOW_REPORT_OUT     directory for the images, default docs/report
#   QUANTUMFLOW_REPORT_README  README whose report block is rewritten, default README.md
#   QUANTUMFLOW_QF             the qf command, default qf
#   QUANTUMFLOW_HTTP_TIMEOUT_S bound on the check request, default 30 (connecting: at most 10)
#   QUANTUMFLOW_REPORT_COMMIT  1: commit README and images when they changed (default 0: leave them)
#   QUANTUMFLOW_REPORT_PUSH    1: push that commit to origin (default 0)
#   QUANTUMFLOW_REPORT_BRANCH  branch to push to, default the checked-out one
#
# Exit status: 0 done (committed or unchanged); 1 the API or `qf report` failed, or the push did;
# 2 a setting is missing or malformed.
set -euo pipefail

api_url=${QUANTUMFLOW_API_URL:-}
token=${QUANTUMFLOW_API_TOKEN:-}
out_dir=${QUANTUMFLOW_REPORT_OUT:-docs/report}
readme=${QUANTUMFLOW_REPORT_README:-README.md}
qf=${QUANTUMFLOW_QF:-qf}
timeout_s=${QUANTUMFLOW_HTTP_TIMEOUT_S:-30}
commit=${QUANTUMFLOW_REPORT_COMMIT:-0}
push=${QUANTUMFLOW_REPORT_PUSH:-0}
branch=${QUANTUMFLOW_REPORT_BRANCH:-}
connect_s=$((timeout_s < 10 ? timeout_s : 10))

mask() {
    local text=$1
    if [[ -n $token ]]; then text=${text//"$token"/'***'}; fi
    printf '%s' "$text"
}
say() { printf 'report: %s\n' "$(mask "$*")"; }
fail() { say "$2" >&2; exit "$1"; }

[[ -n $api_url ]] ||
    fail 2 "QUANTUMFLOW_API_URL is not set (the deployed API's base URL, e.g. https://quantumflow.fly.dev)"
[[ $api_url =~ ^https?:// ]] || fail 2 "QUANTUMFLOW_API_URL must start with http:// or https://"
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || fail 2 "QUANTUMFLOW_HTTP_TIMEOUT_S must be a whole number of seconds >= 1"
[[ $commit =~ ^[01]$ && $push =~ ^[01]$ ]] || fail 2 "QUANTUMFLOW_REPORT_COMMIT and QUANTUMFLOW_REPORT_PUSH are 0 or 1"
command -v "$qf" >/dev/null || fail 2 "the qf command ($qf) is not installed: pip install the project first"

api_url=${api_url%/}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The CSV export answers (one row): a wrong URL or token fails here with the API's own words,
#    before the report starts. The URL and the header reach curl on its standard input.
curl_config() {
    printf 'url = "%s"\n' "$1"
    if [[ -n $token ]]; then printf 'header = "Authorization: Bearer %s"\n' "$token"; fi
}
code=0
status=$(curl_config "$api_url/api/v1/trades?limit=1&format=csv" |
    curl -sS --config - -o "$work/probe" -w '%{http_code}' --connect-timeout "$connect_s" --max-time "$timeout_s" \
        --retry 3 --retry-delay 5 --retry-connrefused 2>"$work/err") || code=$?
if [[ $code -ne 0 ]]; then
    fail 1 "$api_url could not be reached: $(tr '\n' ' ' <"$work/err")"
fi
if [[ $status != 200 ]]; then
    fail 1 "$api_url/api/v1/trades?format=csv answered $status: $(head -c 300 "$work/probe" | tr '\n' ' ')"
fi
say "$api_url serves its CSV export; drawing the report into $out_dir"

# 2. The report: every line of qf's output is masked before it is shown.
# the token goes by the environment (qf report reads QF_API_TOKEN), never on a command line `ps` shows
args=(report --api "$api_url" --out "$out_dir" --readme "$readme")
code=0
QF_API_TOKEN="$token" "$qf" "${args[@]}" >"$work/qf.log" 2>&1 || code=$?
while IFS= read -r line || [[ -n $line ]]; do printf '  %s\n' "$(mask "$line")"; done <"$work/qf.log"
[[ $code -eq 0 ]] || fail 1 "qf report failed (exit status $code)"

# 3. Commit README and images only when they changed (new images count: they are staged first).
if [[ $commit != 1 ]]; then
    say "done (QUANTUMFLOW_REPORT_COMMIT is not 1: nothing committed)"
    exit 0
fi
git add -A -- "$readme" "$out_dir"
if git diff --cached --quiet -- "$readme" "$out_dir"; then
    say "README and images unchanged: nothing to commit"
    exit 0
fi
# The bot's identity for this commit only (the checkout's git config is left as it is). GitHub
# starts no workflow for a push made with the workflow's own token, and [skip ci] says so anyway.
as_bot=(git -c user.name="github-actions[bot]" -c user.email="41898282+github-actions[bot]@users.noreply.github.com")
"${as_bot[@]}" commit --quiet -m "docs(report): daily trading report [skip ci]" -- "$readme" "$out_dir"
say "committed $(git rev-parse --short HEAD): $(git show --name-only --format= HEAD | tr '\n' ' ')"
if [[ $push != 1 ]]; then
    exit 0
fi
branch=${branch:-$(git rev-parse --abbrev-ref HEAD)}
if ! git push --quiet origin "HEAD:refs/heads/$branch"; then
    # main moved while the report ran: put the report commit on top of it, once
    say "push refused; rebasing on origin/$branch and pushing again"
    "${as_bot[@]}" pull --quiet --rebase origin "$branch" ||
        fail 1 "could not rebase the report commit on origin/$branch"
    git push --quiet origin "HEAD:refs/heads/$branch" || fail 1 "could not push the report commit to $branch"
fi
say "pushed to $branch"
