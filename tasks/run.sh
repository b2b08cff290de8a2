#!/usr/bin/env bash
# cloudbake's entry point on a fresh Debian 12 / Ubuntu 24.04 machine.
#
#   bash tasks/run.sh bake          install what is missing, then `doit bake`
#   bash tasks/run.sh test          install what is missing (test tools too), then lint, type-check, pytest
#   bash tasks/run.sh doit ARGS...  install what is missing, then `doit ARGS...`
#
# Idempotent: system packages are installed only when missing (apt, as root or
# through sudo; otherwise the exact command is printed), Python dependencies go into
# .venv and are reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_PACKAGES=(qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64 gpgv gnupg openssh-client
                  python3 python3-venv ca-certificates)
TEST_PACKAGES=(mmdebstrap grub-efi-amd64-bin grub-common mtools dosfstools fdisk e2fsprogs genisoimage
               cloud-image-utils curl qemu-user-static binfmt-support arch-test docker-registry apache2-utils
               openssl)

say() { printf '[setup] %s\n' "$*" >&2; }

ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
    if [ "$(id -u)" -eq 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -q >/dev/null && "${apt[@]}" >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        say "installing ${missing[*]} (sudo)"
        sudo apt-get update -q >/dev/null && sudo "${apt[@]}" >/dev/null
    else
        say "missing system packages; run:"
        say "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
}

ensure_venv() {
    local extras="$1" stamp=".venv/.cloudbake-installed"
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv"
        python3 -m venv .venv
    fi
    local have
    have="$(cat "$stamp" 2>/dev/null || true)"
    # A .venv with the test extras also serves the plain commands.
    if [ "$have" != "$want" ] && { [ -n "$extras" ] || [ "$have" != "${want}[test]" ]; }; then
        say "installing Python dependencies into .venv"
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e ".$extras"
        echo "$want" > "$stamp"
    fi
}

command="${1:-bake}"
shift || true
case "$command" in
    bake)
        ensure_packages "${RUNTIME_PACKAGES[@]}"
        ensure_venv ""
        exec .venv/bin/doit bake "$@"
        ;;
    doit)
        ensure_packages "${RUNTIME_PACKAGES[@]}"
        ensure_venv ""
        exec .venv/bin/doit "$@"
        ;;
    test)
        ensure_packages "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
        ensure_venv "[test]"
        say "ruff"
        .venv/bin/ruff check .
        say "mypy"
        .venv/bin/mypy
        say "pytest"
        exec .venv/bin/pytest "$@"
        ;;
    *)
        say "unknown command '$command' (use: bake, test, doit ARGS...)"
        exit 2
        ;;
esac
