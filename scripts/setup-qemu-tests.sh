#!/usr/bin/env bash
# Installs what the QEMU guest tests (tests/tests/qemu_guest.rs) need on Debian 12, as root:
#
#   - the bookworm-backports suite, as a new apt source derived from this machine's own
#     /etc/apt/sources.list.d/debian.sources (same URIs and Signed-By keyring);
#   - from backports: qemu-system-x86 and qemu-system-gui (QEMU 10; the latter ships QEMU's
#     reference backend /usr/lib/qemu/vhost-user-gpu);
#   - busybox-static (the guest's shell), xz-utils (Debian's kernel modules are .ko.xz),
#     gcc and libc6-dev (the static guest program), linux-libc-dev and libdrm-dev (the
#     fbdev/console and DRM UAPI headers: Debian ships drm.h/drm_mode.h in libdrm-dev);
#   - first, the build dependencies (scripts/setup-build-deps.sh: virglrenderer, bindgen's
#     libclang, Mesa's EGL and llvmpipe);
#   - for the packaging test (tests/tests/packaging.rs): dpkg-dev (dpkg-shlibdeps, which
#     cargo-deb derives Depends with), libvirt-clients and libxml2-utils
#     (virt-xml-validate), and cargo-deb itself (`cargo install`, into ~/.cargo/bin);
#   - a Debian 6.12 kernel (linux-image-*-amd64-unsigned from backports), fetched with
#     `apt-get download` and unpacked with `dpkg -x` into the cache directory: nothing is
#     installed into /boot.
#
#   scripts/setup-qemu-tests.sh [CACHE_DIR]      (default: target/qemu-test-cache)
#
# Idempotent: when everything is already there it touches neither apt nor the network.
# The tests find the kernel in $VGPU_QEMU_CACHE or target/qemu-test-cache.
set -euo pipefail

say() { echo "setup-qemu-tests: $*"; }
die() {
    echo "setup-qemu-tests: error: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${VGPU_QEMU_CACHE:-"$here/target/qemu-test-cache"}}
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot tell the Debian codename from /etc/os-release"
suite="$codename-backports"
src=/etc/apt/sources.list.d/debian.sources
dst=/etc/apt/sources.list.d/vgpu-sandbox-$suite.sources
kernel_series=6.12

# Packages from the main suite, and from backports (QEMU 10).
main_pkgs=(busybox-static xz-utils gcc libc6-dev linux-libc-dev libdrm-dev dpkg-dev libvirt-clients
    libxml2-utils)
bpo_pkgs=(qemu-system-x86 qemu-system-gui)

installed() {
    # installed PKG [MIN_VERSION]
    local v
    v=$(dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null) || return 1
    case "$v" in "install ok installed "*) ;; *) return 1 ;; esac
    [ -z "${2:-}" ] || dpkg --compare-versions "${v##* }" ge "$2"
}

kernel_ready() {
    [ -s "$cache/kernel/VERSION" ] || return 1
    local rel
    rel=$(cat "$cache/kernel/VERSION")
    [ -f "$cache/kernel/root/boot/vmlinuz-$rel" ] &&
        [ -d "$cache/kernel/root/lib/modules/$rel/kernel/drivers/gpu/drm/virtio" ] &&
        [ "$(readlink "$cache/kernel/vmlinuz")" = "root/boot/vmlinuz-$rel" ]
}

all_ready() {
    local p
    for p in "${main_pkgs[@]}"; do installed "$p" || return 1; done
    installed qemu-system-x86 1:10 || return 1
    installed qemu-system-gui 1:10 || return 1
    [ -x /usr/lib/qemu/vhost-user-gpu ] || return 1
    kernel_ready
}

report() {
    say "qemu-system-x86_64: $(qemu-system-x86_64 --version | head -n 1)"
    say "reference backend:  /usr/lib/qemu/vhost-user-gpu"
    say "busybox:            $(command -v busybox) ($(dpkg-query -W -f='${Version}' busybox-static))"
    say "kernel:             $cache/kernel/vmlinuz -> $(readlink "$cache/kernel/vmlinuz") ($(cat "$cache/kernel/PACKAGE"))"
}

"$here/scripts/setup-build-deps.sh"

# Major version pinned: cargo-deb announces that a later one will refuse the dev-profile
# package the packaging test builds.
if ! command -v cargo-deb >/dev/null; then
    say "installing cargo-deb (cargo install --locked)"
    cargo install --quiet --locked cargo-deb --version '^3.8' || die "cargo install cargo-deb failed"
fi

if all_ready; then
    say "everything is already in place; nothing to do"
    report
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (it installs packages with apt-get)"
command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"
export DEBIAN_FRONTEND=noninteractive

# 1. The backports suite, derived from the main archive's stanza of debian.sources (the
#    stanza whose Suites list the codename itself, not -security). Only URIs, Suites,
#    Components and Signed-By are written; the host names stay wherever the machine's own
#    file has them.
if [ -r "$src" ]; then
    stanza=$(awk -v want="$codename" -v suite="$suite" '
        function flush() {
            if (!done && has && uris != "") {
                print "Types: deb"
                print "URIs: " uris
                print "Suites: " suite
                print "Components: main"
                if (keyring != "") print "Signed-By: " keyring
                done = 1
            }
            uris = ""; keyring = ""; has = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
        /^Signed-By:/ { sub(/^Signed-By:[[:space:]]*/, ""); keyring = $0 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) has = 1 }
        END { flush() }' "$src")
else
    stanza=""
fi
[ -n "$stanza" ] || die "no stanza for suite '$codename' in $src to derive '$suite' from"
if [ -f "$dst" ] && [ "$(cat "$dst")" = "$stanza" ]; then
    say "apt source $dst already present"
else
    printf '%s\n' "$stanza" >"$dst"
    say "wrote apt source $dst (suite $suite, URIs and Signed-By from $src)"
fi

say "apt-get update"
apt-get -q update >/dev/null || die "apt-get update failed"

# 2. Packages.
say "installing ${main_pkgs[*]}"
apt-get -q -y install --no-install-recommends "${main_pkgs[@]}" >/dev/null ||
    die "apt-get install ${main_pkgs[*]} failed"
say "installing from $suite: ${bpo_pkgs[*]}"
apt-get -q -y install --no-install-recommends -t "$suite" "${bpo_pkgs[@]}" >/dev/null ||
    die "apt-get install -t $suite ${bpo_pkgs[*]} failed"
installed qemu-system-x86 1:10 || die "qemu-system-x86 from $suite is not QEMU 10 or newer"
[ -x /usr/lib/qemu/vhost-user-gpu ] || die "qemu-system-gui has no /usr/lib/qemu/vhost-user-gpu"

# 3. The guest kernel: the newest linux-image-6.12.*-amd64-unsigned in backports.
if kernel_ready; then
    say "kernel already unpacked in $cache/kernel"
else
    # Generic flavour only ("-amd64-unsigned", not "-rt-amd64" or "-cloud-amd64"); prefer
    # the backports suite's newest, else the newest any configured suite has.
    names=$(apt-cache search --names-only "^linux-image-${kernel_series//./\\.}\\.[^-]*-amd64-unsigned\$" |
        awk '{print $1}')
    [ -n "$names" ] || die "no linux-image-$kernel_series.*-amd64-unsigned package found (is $suite reachable?)"
    # shellcheck disable=SC2086
    table=$(apt-cache madison $names | awk -F'|' '{gsub(/ /, "", $1); gsub(/ /, "", $2); print $2, $1, $3}')
    pick=$(echo "$table" | grep " $suite/" | sort -V | tail -n 1 || true)
    [ -n "$pick" ] || pick=$(echo "$table" | sort -V | tail -n 1)
    pkg=$(echo "$pick" | awk '{print $2}')
    ver=$(echo "$pick" | awk '{print $1}')
    rel=${pkg#linux-image-}
    rel=${rel%-unsigned}
    say "downloading $pkg $ver"
    rm -rf "$cache/kernel.tmp"
    mkdir -p "$cache/kernel.tmp/deb"
    # apt's download sandbox user must be able to write there.
    chmod 0777 "$cache/kernel.tmp/deb"
    (cd "$cache/kernel.tmp/deb" && apt-get -q download "$pkg=$ver" >/dev/null) ||
        die "apt-get download $pkg=$ver failed"
    deb=$(find "$cache/kernel.tmp/deb" -name '*.deb' | head -n 1)
    [ -n "$deb" ] || die "apt-get download $pkg=$ver produced no .deb"
    say "unpacking $(basename "$deb") into $cache/kernel/root (dpkg -x; nothing goes to /boot)"
    dpkg -x "$deb" "$cache/kernel.tmp/root"
    [ -f "$cache/kernel.tmp/root/boot/vmlinuz-$rel" ] || die "$deb has no boot/vmlinuz-$rel"
    echo "$rel" >"$cache/kernel.tmp/VERSION"
    # A stable name for the QEMU command line (README.md, the tests).
    ln -s "root/boot/vmlinuz-$rel" "$cache/kernel.tmp/vmlinuz"
    echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$cache/kernel.tmp/PACKAGE"
    rm -rf "$cache/kernel.tmp/deb" "$cache/kernel"
    mv "$cache/kernel.tmp" "$cache/kernel"
    kernel_ready || die "the unpacked kernel has no virtio-gpu module directory"
fi

report
