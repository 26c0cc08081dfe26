#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for the report browser test.
# Idempotent: does nothing when it is already installed. Exits non-zero if it cannot install.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $CHROMIUM"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install chromium: apt-get not found (install the 'chromium' package by hand)" >&2
    exit 2
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "cannot install chromium: not root and no passwordless sudo" >&2
        exit 3
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
if [ ! -x "$CHROMIUM" ]; then
    echo "chromium package installed but $CHROMIUM is missing" >&2
    exit 4
fi
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
