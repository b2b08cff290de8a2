#!/usr/bin/env bash
# cloudbake's entry point on a fresh Debian 12 / Ubuntu 24.04 machine, or a Mac with Homebrew.
#
#   bash tasks/run.sh bake          install what is missing, then `doit bake`
#   bash tasks/run.sh test          install what is missing (test tools too), then lint, type-check, pytest
#   bash tasks/run.sh doit ARGS...  install what is missing, then `doit ARGS...`
#   bash tasks/run.sh packages [test]  only the system packages (what is missing), nothing else
#
# Idempotent: system packages are installed only when missing (Linux: apt, as root or
# through sudo; macOS: Homebrew, never apt); when that is not possible the exact command
# is printed. Python dependencies go into .venv and are reinstalled only when
# pyproject.toml changes. Written for bash 3.2 too (macOS's /bin/bash).
set -euo pipefail
cd "$(dirname "$0")/.."

OS="$(uname -s)"
RUNTIME_PACKAGES=(qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64 gpgv gnupg openssh-client zstd git tar
                  python3 python3-venv ca-certificates)
TEST_PACKAGES=(mmdebstrap grub-efi-amd64-bin grub-common mtools dosfstools fdisk e2fsprogs genisoimage
               cloud-image-utils curl qemu-user-static binfmt-support arch-test docker-registry apache2-utils
               openssl)
# Homebrew: qemu brings qemu-system-*, qemu-img and the edk2 UEFI firmware; gnupg brings gpgv;
# macOS has ssh, curl and openssl. The e2e fixtures are Debian images built with mmdebstrap,
# which only runs on Linux: on a Mac the test command runs everything but the e2e tests.
BREW_RUNTIME_PACKAGES=(qemu gnupg zstd python@3.12)
BREW_TEST_PACKAGES=(distribution httpd)

say() { printf '[setup] %s\n' "$*" >&2; }

ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    INSTALLED_NOW="${missing[*]}"
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

ensure_brew_packages() {
    if ! command -v brew >/dev/null 2>&1; then
        say "cloudbake installs its tools on macOS with Homebrew (https://brew.sh); once it is there, run:"
        say "  brew install $*"
        exit 1
    fi
    local missing=() pkg
    for pkg in "$@"; do
        brew list --formula "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]} (brew)"
    if ! brew install "${missing[@]}" >&2; then
        say "brew could not install them; run:"
        say "  brew install ${missing[*]}"
        exit 1
    fi
}

INSTALLED_NOW=""

quiet_registry_service() {
    # Debian's docker-registry package enables a registry open to the network on :5000; the
    # tests only need the program (they start their own on 127.0.0.1), so a service this
    # script just installed is stopped and disabled again.
    case " $INSTALLED_NOW " in *" docker-registry "*) ;; *) return 0 ;; esac
    command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] || return 0
    say "disabling the docker-registry service its package started (the tests run their own registry)"
    if [ "$(id -u)" -eq 0 ]; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    else
        sudo -n systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
}

ensure_system() {
    if [ "$OS" = Darwin ]; then
        if [ "${1:-}" = test ]; then
            ensure_brew_packages "${BREW_RUNTIME_PACKAGES[@]}" "${BREW_TEST_PACKAGES[@]}"
        else
            ensure_brew_packages "${BREW_RUNTIME_PACKAGES[@]}"
        fi
    elif [ "${1:-}" = test ]; then
        ensure_packages "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
        quiet_registry_service
    else
        ensure_packages "${RUNTIME_PACKAGES[@]}"
    fi
}

python_for_venv() {
    # Homebrew's Python on a Mac (the system's /usr/bin/python3 is too old); python3 elsewhere.
    if [ "$OS" = Darwin ] && command -v brew >/dev/null 2>&1 && [ -x "$(brew --prefix)/bin/python3.12" ]; then
        echo "$(brew --prefix)/bin/python3.12"
    else
        echo python3
    fi
}

sha256_16() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -c1-16
}

ensure_venv() {
    local extras="$1" stamp=".venv/.cloudbake-installed"
    local want
    want="$(sha256_16 pyproject.toml)-$extras"
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv"
        "$(python_for_venv)" -m venv .venv
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
        ensure_system
        ensure_venv ""
        exec .venv/bin/doit bake "$@"
        ;;
    doit)
        ensure_system
        ensure_venv ""
        exec .venv/bin/doit "$@"
        ;;
    packages)
        ensure_system "${1:-}"
        ;;
    test)
        ensure_system test
        ensure_venv "[test]"
        say "ruff"
        .venv/bin/ruff check .
        say "mypy"
        .venv/bin/mypy
        say "pytest"
        if [ "$OS" = Darwin ]; then
            say "macOS: the e2e tests need Debian fixture images built with mmdebstrap (Linux only); running the rest"
            exec .venv/bin/pytest -m "not e2e and not arm64" "$@"
        fi
        exec .venv/bin/pytest "$@"
        ;;
    *)
        say "unknown command '$command' (use: bake, test, doit ARGS..., packages [test])"
        exit 2
        ;;
esac
