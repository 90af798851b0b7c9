#!/usr/bin/env bash
# Build a minimal Debian base image with Python 3.11 from Debian's own packages and
# `docker import` it as TAG: the stand-in for python:3.11-slim where no registry answers.
#
#   tests/docker/build-base.sh TAG [MIRROR]     (as root: debootstrap needs it)
#
# The packages come from base-packages.txt next to this script; MIRROR defaults to
# http://deb.debian.org/debian. tests/docker/base_image.py names TAG after a hash of
# this script and the package list, so each machine builds it once.
set -euo pipefail

tag=${1:?usage: build-base.sh TAG [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
suite=bookworm
here=$(cd "$(dirname "$0")" && pwd)
packages=$(grep -v '^\s*#' "$here/base-packages.txt" | xargs | tr ' ' ',')

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/qf-base.XXXXXX")
trap 'rm -rf --one-file-system "$rootfs"' EXIT

echo "build-base: debootstrap $suite ($packages) from $mirror" >&2
# minbase: the Priority: required set (dpkg, apt, passwd for useradd) plus our packages.
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >&2

# What an image does not need: package caches, docs, man pages, apt lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
       "$rootfs"/usr/share/info/* "$rootfs"/var/log/* "$rootfs"/tmp/*
"$rootfs"/usr/bin/python3 -c 'import sqlite3, ensurepip, venv, sys; assert sys.version_info[:2] == (3, 11)'

echo "build-base: docker import $tag" >&2
tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap $suite minbase + $packages (tests/docker/build-base.sh)" \
    - "$tag" >/dev/null
echo "$tag"
