#!/usr/bin/env bash
# Installs what building vgpu-sandbox needs on Debian 12, as root: the `virgl` cargo
# feature (on by default) binds the system's virglrenderer with bindgen, and renders with
# Mesa's EGL and llvmpipe:
#
#   libvirglrenderer-dev libclang-dev pkg-config   (build: headers, bindgen, pkg-config)
#   libegl-mesa0 libgl1-mesa-dri                   (run: EGL surfaceless and llvmpipe)
#
# Idempotent: when everything is installed it touches neither apt nor the network. A host
# that cannot have these builds without virgl: cargo build --no-default-features.
set -euo pipefail

pkgs=(libvirglrenderer-dev libclang-dev pkg-config libegl-mesa0 libgl1-mesa-dri)

say() { echo "setup-build-deps: $*"; }
die() {
    echo "setup-build-deps: error: $*" >&2
    exit 1
}

installed() {
    local v
    v=$(dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null) || return 1
    [ "$v" = "install ok installed" ]
}

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
    say "build dependencies already installed (${pkgs[*]})"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root to install ${missing[*]} (or build with --no-default-features)"
command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"
export DEBIAN_FRONTEND=noninteractive
say "apt-get update"
apt-get -q update >/dev/null || die "apt-get update failed"
say "installing ${missing[*]}"
apt-get -q -y install --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
