#!/bin/bash
# Builds the XCP-ng 8.3 package: dist/zfs-ng-VERSION-1.noarch.rpm (VERSION from
# setup.cfg) with rpmbuild (Debian's `rpm` package: scripts/setup-host.sh).
#   - Source0: a tarball of this work tree (tracked and untracked-but-not-ignored
#     files, as they are now) under packaging/, the runtime packages, README.md;
#   - Source1-4: the wheels pinned in packaging/rpm/vendor.lock, fetched once with
#     pip into build/rpm/wheels and sha256-checked before every build.
# Prints the path of the RPM; rpmbuild's log is in build/rpm/rpmbuild.log.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-rpm: $*" >&2; exit 1; }
command -v rpmbuild >/dev/null || die "rpmbuild not found (apt-get install rpm; scripts/setup-host.sh does)"

VERSION=$(sed -n 's/^version *= *\([^ ]*\) *$/\1/p' setup.cfg | head -n1)
[ -n "$VERSION" ] || die "no version in setup.cfg"
TOP=$PWD/build/rpm
WHEELS=$TOP/wheels
rm -rf "$TOP/BUILD" "$TOP/BUILDROOT" "$TOP/RPMS" "$TOP/SOURCES" "$TOP/SRPMS" "$TOP/SPECS"
mkdir -p "$TOP/SOURCES" "$WHEELS" dist

# -- the pinned wheels -------------------------------------------------------
PIP=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || PIP=(python3 -m pip)
sha() { sha256sum "$1" | cut -d' ' -f1; }
grep -v '^#' packaging/rpm/vendor.lock | while read -r req wheel hash; do
    [ -n "$req" ] || continue
    if [ ! -f "$WHEELS/$wheel" ] || [ "$(sha "$WHEELS/$wheel")" != "$hash" ]; then
        rm -f "$WHEELS/$wheel"
        reqfile=$(mktemp)
        echo "$req --hash=sha256:$hash" > "$reqfile"
        "${PIP[@]}" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.6 --implementation py --abi none --platform any \
            -d "$WHEELS" -r "$reqfile" >&2 || { rm -f "$reqfile"; die "pip download $req failed"; }
        rm -f "$reqfile"
    fi
    [ -f "$WHEELS/$wheel" ] || die "pip did not fetch $wheel"
    [ "$(sha "$WHEELS/$wheel")" = "$hash" ] || die "$wheel: sha256 mismatch"
    cp "$WHEELS/$wheel" "$TOP/SOURCES/"
done

# -- the source tarball --------------------------------------------------------
paths=(README.md setup.cfg packaging plugins nvmeof_target nbd_server blockio sr_tools)
list=$(mktemp)
trap 'rm -f "$list"' EXIT
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard -- "${paths[@]}" |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done > "$list"
else
    find "${paths[@]}" \( -name __pycache__ -o -name '*.pyc' \) -prune -o \( -type f -o -type l \) -print0 > "$list"
fi
# S: the prefix goes on member names, never on symlink targets (the method links)
tar --null -T "$list" --transform "s,^,zfs-ng-$VERSION/,S" --owner=0 --group=0 \
    -czf "$TOP/SOURCES/zfs-ng-$VERSION.tar.gz"

# -- rpmbuild --------------------------------------------------------------------
if ! rpmbuild -bb --define "_topdir $TOP" --define "zfsng_version $VERSION" \
        packaging/rpm/zfs-ng.spec > "$TOP/rpmbuild.log" 2>&1; then
    tail -n 40 "$TOP/rpmbuild.log" >&2
    die "rpmbuild failed (log: $TOP/rpmbuild.log)"
fi
rpm=$(ls "$TOP"/RPMS/noarch/zfs-ng-"$VERSION"-*.noarch.rpm)
rm -f dist/zfs-ng-*.noarch.rpm
cp "$rpm" dist/
[ -f dist/.gitignore ] || echo '*' > dist/.gitignore   # build output, never committed
echo "dist/$(basename "$rpm")"
