#!/usr/bin/env bash
# Health of the deployed QuantumFlow: GET {API}/health; on failure a Telegram alert naming the
# problems (Bot API sendMessage), and exit 1. Run by .github/workflows/health.yml every 15 minutes;
# tests/test_workflow_scripts.py runs it against a real `qf api` and the fake Bot API.
#
# Settings (environment; the tokens are never printed, nor put on a command line):
#   QUANTUMFLOW_API_URL            the deployed API's base URL, e.g. https://quantumflow.fly.dev (required)
#   QUANTUMFLOW_HEALTH_PATH        default /health (200 only while every service beats and every book is synced)
#   QUANTUMFLOW_HEALTH_ATTEMPTS    answers asked for before calling it unhealthy, default 3 (a book that
#                                  resyncs for a few seconds is no alert)
#   QUANTUMFLOW_HEALTH_RETRY_S     seconds between those attempts, default 20
#   QUANTUMFLOW_HTTP_TIMEOUT_S     bound on one request, default 15 (connecting: at most 10)
#   QUANTUMFLOW_TELEGRAM_TOKEN     bot token from @BotFather (empty: no alert, the run still fails)
#   QUANTUMFLOW_TELEGRAM_CHAT_IDS  comma-separated chat ids to alert (a group's is negative)
#   QUANTUMFLOW_TELEGRAM_API       Bot API base, default https://api.telegram.org (a test points it at a fake)
#
# Exit status: 0 healthy; 1 unhealthy or unreachable (alerted when Telegram is configured);
# 2 a setting is missing or malformed.
set -euo pipefail

api_url=${QUANTUMFLOW_API_URL:-}
health_path=${QUANTUMFLOW_HEALTH_PATH:-/health}
attempts=${QUANTUMFLOW_HEALTH_ATTEMPTS:-3}
retry_s=${QUANTUMFLOW_HEALTH_RETRY_S:-20}
timeout_s=${QUANTUMFLOW_HTTP_TIMEOUT_S:-15}
tg_token=${QUANTUMFLOW_TELEGRAM_TOKEN:-}
tg_chats=${QUANTUMFLOW_TELEGRAM_CHAT_IDS:-}
tg_api=${QUANTUMFLOW_TELEGRAM_API:-https://api.telegram.org}
connect_s=$((timeout_s < 10 ? timeout_s : 10))

say() { printf 'health-check: %s\n' "$(mask "$*")"; }
fail_usage() { say "$*" >&2; exit 2; }

# Any text that reaches the log goes through mask: curl's or Telegram's words never show the token.
mask() {
    local text=$1
    if [[ -n $tg_token ]]; then text=${text//"$tg_token"/'***'}; fi
    printf '%s' "$text"
}

[[ -n $api_url ]] ||
    fail_usage "QUANTUMFLOW_API_URL is not set (the deployed API's base URL, e.g. https://quantumflow.fly.dev)"
[[ $api_url =~ ^https?:// ]] || fail_usage "QUANTUMFLOW_API_URL must start with http:// or https://"
[[ $attempts =~ ^[1-9][0-9]*$ ]] || fail_usage "QUANTUMFLOW_HEALTH_ATTEMPTS must be a whole number >= 1"
[[ $retry_s =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail_usage "QUANTUMFLOW_HEALTH_RETRY_S must be a number of seconds"
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || fail_usage "QUANTUMFLOW_HTTP_TIMEOUT_S must be a whole number of seconds >= 1"
if [[ -n $tg_token && ! $tg_token =~ ^[0-9]+:[A-Za-z0-9_-]+$ ]]; then
    fail_usage "QUANTUMFLOW_TELEGRAM_TOKEN is not a bot token (digits:letters, as @BotFather gives it)"
fi
if [[ -n $tg_token && ! $tg_chats =~ ^-?[0-9]+(,-?[0-9]+)*$ ]]; then
    fail_usage "QUANTUMFLOW_TELEGRAM_CHAT_IDS must be comma-separated chat ids when QUANTUMFLOW_TELEGRAM_TOKEN is set"
fi

url="${api_url%/}${health_path}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The problems /health names ("broker: last heartbeat 4.1 s ago", one a line), or a line saying
# the answer is not /health's JSON (a proxy's error page).
problems_of() {
    python3 - "$1" <<'PY'
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as f:
        body = json.load(f)
    problems = body["problems"]
    if not isinstance(problems, list):
        raise TypeError
except (OSError, ValueError, KeyError, TypeError):
    print("the answer is not /health's JSON")
else:
    print("\n".join(str(p) for p in problems) or "no problem named")
PY
}

status=""
detail=""
for ((n = 1; n <= attempts; n++)); do
    code=0
    status=$(curl -sS -o "$work/body" -w '%{http_code}' --connect-timeout "$connect_s" --max-time "$timeout_s" \
        -H 'Accept: application/json' "$url" 2>"$work/err") || code=$?
    if [[ $code -eq 0 && $status == 200 ]]; then
        say "$url answered 200: healthy (attempt $n of $attempts)"
        exit 0
    fi
    if [[ $code -ne 0 ]]; then
        status="unreachable"
        detail="could not be reached: $(tr '\n' ' ' <"$work/err" | sed 's/ *$//')"
    else
        detail=$(problems_of "$work/body")
    fi
    say "$url: ${status} (attempt $n of $attempts): ${detail//$'\n'/; }"
    if ((n < attempts)); then sleep "$retry_s"; fi
done

text="QuantumFlow is unhealthy: $url"
if [[ $status == unreachable ]]; then
    text+=" $detail"
else
    text+=" answered $status"
    while IFS= read -r line; do text+=$'\n'"- $line"; done <<<"$detail"
fi
if [[ -n ${GITHUB_RUN_ID:-} && -n ${GITHUB_REPOSITORY:-} ]]; then
    text+=$'\n'"${GITHUB_SERVER_URL:-https://github.com}/${GITHUB_REPOSITORY}/actions/runs/${GITHUB_RUN_ID}"
fi
text=${text:0:3500}  # a Telegram message holds 4096 characters

# POST {api}/bot{token}/sendMessage, form-encoded chat_id and text. The URL travels to curl on
# its standard input (--config -), so the token is in no process's argument list.
send_alert() {
    local chat=$1 code=0 http
    http=$(printf 'url = "%s/bot%s/sendMessage"\n' "${tg_api%/}" "$tg_token" |
        curl -sS --config - -o "$work/tg" -w '%{http_code}' --connect-timeout "$connect_s" --max-time "$timeout_s" \
            --retry 2 --retry-delay 3 --data-urlencode "chat_id=$chat" --data-urlencode "text=$text" \
            2>"$work/tgerr") || code=$?
    if [[ $code -ne 0 ]]; then
        say "the Telegram alert to chat $chat failed: $(tr '\n' ' ' <"$work/tgerr")" >&2
        return 1
    fi
    if [[ $http != 200 ]] ||
        ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("ok") is True else 1)' \
            "$work/tg" 2>/dev/null; then
        local why
        why=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("description", ""))' "$work/tg" \
            2>/dev/null || true)
        say "Telegram refused the alert to chat $chat: HTTP $http ${why}" >&2
        return 1
    fi
    say "alert sent to Telegram chat $chat"
}

alerted=0
if [[ -z $tg_token ]]; then
    say "no Telegram alert: QUANTUMFLOW_TELEGRAM_TOKEN is not set" >&2
else
    IFS=',' read -r -a chats <<<"$tg_chats"
    for chat in "${chats[@]}"; do
        send_alert "$chat" || alerted=1
    done
fi
if [[ ${GITHUB_ACTIONS:-} == true ]]; then
    printf '::error title=QuantumFlow unhealthy::%s\n' "$(mask "$url: $status")"
fi
say "UNHEALTHY: $url: $status$([[ $alerted -ne 0 ]] && printf ' (and the alert failed)')" >&2
exit 1
