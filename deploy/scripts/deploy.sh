#!/usr/bin/env bash
# Deploy one commit of main to Fly.io with `flyctl deploy`, only while it is still main's head.
# Run by .github/workflows/deploy.yml once CI passed on that commit; tests/test_workflow_scripts.py
# runs it against a local git remote.
#
# Why the head check: each push to main starts its own CI run and, when it passes, its own deploy.
# The deploy workflow's concurrency group never lets two overlap, but CI runs can finish out of
# order; without the check an older commit whose CI ended last would replace a newer deploy.
#
# Settings (environment; the token is never printed):
#   FLY_API_TOKEN                  Fly deploy token (`fly tokens create deploy`), read by flyctl (required)
#   QUANTUMFLOW_DEPLOY_SHA         the commit to deploy, default HEAD (the workflow passes the one CI tested)
#   QUANTUMFLOW_DEPLOY_BRANCH      default main
#   QUANTUMFLOW_DEPLOY_REMOTE      default origin
#   QUANTUMFLOW_FLYCTL             the flyctl command, default flyctl
#   QUANTUMFLOW_FLY_CONFIG         default fly.toml
#
# Exit status: 0 deployed, or skipped because the branch has moved on; 1 the deploy failed;
# 2 a setting is missing or the checkout is not the commit asked for.
set -euo pipefail

sha=${QUANTUMFLOW_DEPLOY_SHA:-}
branch=${QUANTUMFLOW_DEPLOY_BRANCH:-main}
remote=${QUANTUMFLOW_DEPLOY_REMOTE:-origin}
flyctl=${QUANTUMFLOW_FLYCTL:-flyctl}
config=${QUANTUMFLOW_FLY_CONFIG:-fly.toml}

say() { printf 'deploy: %s\n' "$*"; }
fail() { say "$2" >&2; exit "$1"; }

[[ -n ${FLY_API_TOKEN:-} ]] || fail 2 "FLY_API_TOKEN is not set (a deploy token: fly tokens create deploy)"
[[ -f $config ]] || fail 2 "$config not found (run from the repository's root)"
command -v "$flyctl" >/dev/null || fail 2 "$flyctl is not installed (superfly/flyctl-actions/setup-flyctl)"
head=$(git rev-parse HEAD)
sha=${sha:-$head}
[[ $sha == "$head" ]] || fail 2 "the checkout is at ${head:0:12}, not the commit to deploy ${sha:0:12}"

tip=$(git ls-remote --exit-code "$remote" "refs/heads/$branch" | cut -f1) ||
    fail 1 "cannot read $branch from $remote"
if [[ $tip != "$sha" ]]; then
    say "$branch is at ${tip:0:12} now, not ${sha:0:12}: skipped (the newer commit's CI run deploys it)"
    exit 0
fi

say "deploying ${sha:0:12} ($branch) with $config"
# --remote-only: Fly's builder builds the Dockerfile's `fly` stage; flyctl reads FLY_API_TOKEN itself.
# --wait-timeout: the new machine passes its checks only once every book has synced (fly.toml).
"$flyctl" deploy --remote-only --config "$config" --wait-timeout 10m || fail 1 "flyctl deploy failed for ${sha:0:12}"
say "deployed ${sha:0:12}"
