#!/usr/bin/env bash
# Builds the Debian package of vgpu-sandbox with cargo-deb (cargo install --locked cargo-deb):
# the release binary, then its man pages and shell completions (`vgpu-sandbox gen-assets`,
# generated from the binary's own command line), then `cargo deb --no-build`. Prints the
# .deb's path as the last line of stdout.
#
#   scripts/build-deb.sh [--dev] [--output DIR]
#
#   --dev         package the debug binary `cargo build` already made instead of building a
#                 release one (fast; what tests/tests/packaging.rs checks the layout with;
#                 not for distribution: cargo-deb warns that it does not support dev builds)
#   --output DIR  write the .deb into DIR (default: target/debian)
set -euo pipefail

die() {
    echo "build-deb: error: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")/.." && pwd)
profile=release
output=
while [ $# -gt 0 ]; do
    case "$1" in
    --dev) profile=dev ;;
    --output)
        [ $# -ge 2 ] || die "--output needs a directory"
        output=$2
        shift
        ;;
    *) die "unknown argument '$1' (usage: scripts/build-deb.sh [--dev] [--output DIR])" ;;
    esac
    shift
done

command -v cargo-deb >/dev/null ||
    die "cargo-deb not found (install it with: cargo install --locked cargo-deb)"
cd "$here"
# Wherever CARGO_TARGET_DIR or a cargo config puts the build, as cargo-deb will look there.
target=$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || die "cannot tell the target directory from cargo metadata"

deb_args=(-p vgpu-sandbox --no-build)
if [ "$profile" = release ]; then
    cargo build --release -p vgpu-sandbox >&2
    out_dir=$target/release
else
    out_dir=$target/debug
    [ -x "$out_dir/vgpu-sandbox" ] ||
        die "$out_dir/vgpu-sandbox is missing: run cargo build -p vgpu-sandbox first"
    deb_args+=(--profile dev --fast)
fi
[ -z "$output" ] || deb_args+=(--output "$output")

# Regenerated every time: stale pages of a renamed subcommand must not be packaged.
rm -rf "$out_dir/assets"
"$out_dir/vgpu-sandbox" gen-assets "$out_dir/assets" ||
    die "vgpu-sandbox gen-assets failed"
# Debian policy: man pages compressed (cargo-deb compresses only files it did not build).
gzip -9n "$out_dir"/assets/*.1

# cargo-deb prints the package's path on stdout.
deb=$(cargo deb "${deb_args[@]}" | tail -n 1)
[ -f "$deb" ] || die "cargo deb produced no package (it printed '$deb')"
echo "$deb"
