#!/bin/sh
# Fetches QEMU's own vhost-user-gpu backend (Debian package qemu-system-gui) into a cache
# directory, without installing the package, so benchmarks and the reference cross-check
# can run it. Prints the path of the binary on success.
#
#   scripts/fetch-reference-backend.sh [CACHE_DIR]      (default: target/reference-backend)
#
# REFERENCE_SUITE picks the Debian suite: "<codename>-backports" (default; QEMU 10 on
# bookworm) or "<codename>" (the release's own QEMU, 7.2 on bookworm). The suite's apt
# source is derived from this machine's own Debian sources (same URIs and keyring), and apt
# runs with private lists inside the cache directory: the system's apt configuration is
# not changed. Shared libraries the binary needs and the machine lacks are installed with
# apt-get (root only; otherwise the command to run is printed).
#
# Idempotent: a complete cached copy is reused without touching the network.
set -eu

die() {
    echo "fetch-reference-backend: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-"$here/target/reference-backend"}
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot tell the Debian codename from /etc/os-release"
suite=${REFERENCE_SUITE:-"$codename-backports"}
case "$suite" in
"$codename" | "$codename"-*) ;;
*) die "REFERENCE_SUITE=$suite does not belong to this machine's release ($codename)" ;;
esac

dir="$cache/$suite"
bin="$dir/root/usr/lib/qemu/vhost-user-gpu"

# The runtime libraries vhost-user-gpu links against (Debian bookworm package names).
runtime_libs="libpixman-1-0 libgbm1 libvirglrenderer1 libglib2.0-0 libepoxy0 libnuma1"

missing_libs() {
    ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}'
}

usable() {
    [ -x "$bin" ] && [ -s "$dir/VERSION" ] && [ -z "$(missing_libs)" ] &&
        "$bin" --help >/dev/null 2>&1
}

if usable; then
    echo "$bin"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script needs Debian"

if [ ! -x "$bin" ]; then
    # One deb822 stanza of the machine's sources whose Suites list the codename itself
    # (the main archive, not the security one): take its URIs and Signed-By.
    sources=/etc/apt/sources.list.d/debian.sources
    line=""
    if [ -r "$sources" ]; then
        line=$(awk -v want="$codename" -v suite="$suite" '
            function flush() {
                if (!done && uris != "" && has) {
                    n = split(uris, u, " ")
                    opt = (keyring != "") ? " [signed-by=" keyring "]" : ""
                    print "deb" opt " " u[1] " " suite " main"
                    done = 1
                }
                uris = ""; keyring = ""; has = 0
            }
            /^[[:space:]]*$/ { flush(); next }
            /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
            /^Signed-By:/ { sub(/^Signed-By:[[:space:]]*/, ""); keyring = $0 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) has = 1 }
            END { flush() }' "$sources")
    fi
    if [ -z "$line" ] && [ -r /etc/apt/sources.list ]; then
        # One-line format: "deb [opts] URI codename components".
        line=$(awk -v want="$codename" -v suite="$suite" '
            $1 == "deb" {
                i = 2
                opt = ""
                if ($2 ~ /^\[/) { while ($i !~ /\]$/) { opt = opt " " $i; i++ } opt = opt " " $i; i++ }
                if ($(i + 1) == want) { print "deb" opt " " $i " " suite " main"; exit }
            }' /etc/apt/sources.list)
    fi
    [ -n "$line" ] || die "no Debian source for '$codename' found in /etc/apt to derive '$suite' from"

    mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs"
    printf '%s\n' "$line" >"$dir/apt/sources.list"
    set -- -o "Dir::Etc::SourceList=$dir/apt/sources.list" \
        -o "Dir::Etc::SourceParts=$dir/apt/none" \
        -o "Dir::State::Lists=$dir/apt/lists" \
        -o "Dir::Cache=$dir/apt/cache" \
        -o "Debug::NoLocking=1"
    if [ "$(id -u)" = 0 ]; then
        set -- "$@" -o "APT::Sandbox::User=root"
    fi
    apt-get -q "$@" update >"$dir/apt/update.log" 2>&1 ||
        die "apt-get update for '$suite' failed (see $dir/apt/update.log)"
    rm -f "$dir"/debs/qemu-system-gui_*.deb
    (cd "$dir/debs" && apt-get -q "$@" download qemu-system-gui) >"$dir/apt/download.log" 2>&1 ||
        die "cannot download qemu-system-gui from '$suite' (see $dir/apt/download.log)"
    deb=$(ls "$dir"/debs/qemu-system-gui_*.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] || die "apt-get download produced no qemu-system-gui package"
    rm -rf "$dir/root.tmp"
    dpkg-deb -x "$deb" "$dir/root.tmp"
    [ -x "$dir/root.tmp/usr/lib/qemu/vhost-user-gpu" ] ||
        die "$deb holds no usr/lib/qemu/vhost-user-gpu"
    rm -rf "$dir/root"
    mv "$dir/root.tmp" "$dir/root"
    dpkg-deb -f "$deb" Version >"$dir/VERSION"
fi
[ -s "$dir/VERSION" ] || die "$dir/VERSION is missing; remove $dir and run again"

missing=$(missing_libs)
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        die "vhost-user-gpu needs libraries this machine lacks ($(echo $missing)); run as root: apt-get install --no-install-recommends $runtime_libs"
    fi
    echo "fetch-reference-backend: installing runtime libraries for: $(echo $missing)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends $runtime_libs >&2 ||
        die "apt-get install $runtime_libs failed"
    missing=$(missing_libs)
    [ -z "$missing" ] || die "still missing after installing $runtime_libs: $(echo $missing)"
fi
"$bin" --help >/dev/null 2>&1 || die "$bin does not run (--help failed)"
echo "$bin"
