#!/usr/bin/env bash
# Fetch Compose v2 (the `docker compose` plugin, run standalone) from Debian's own
# archive, so the container tests run under both Compose flavours on a machine whose
# Debian release (bookworm) ships only docker-compose 1.29. Debian trixie packages
# Compose 2.26 as a static Go binary; it is unpacked into the project's build folder,
# nothing is installed system-wide. Usage: fetch-compose-v2.sh OUT_BINARY
set -euo pipefail
out=${1:?usage: fetch-compose-v2.sh OUT_BINARY}
version=2.26.1-4
if [ -x "$out" ] && "$out" version 2>/dev/null | grep -q "${version%-*}"; then exit 0; fi
mkdir -p "$(dirname "$out")/apt"
work=$(cd "$(dirname "$out")/apt" && pwd)  # apt takes relative paths as relative to /etc/apt
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/parts"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_opts=(-q -o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts="$work/parts" \
          -o Dir::State::Lists="$work/lists" -o Dir::Cache::archives="$work/archives" \
          -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" download "docker-compose=$version" >/dev/null)
rm -rf "$work/x"
dpkg-deb -x "$work"/docker-compose_"${version}"_*.deb "$work/x"
install -m 0755 "$work/x/usr/libexec/docker/cli-plugins/docker-compose" "$out"
"$out" version
