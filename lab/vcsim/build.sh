#!/bin/sh
# Build governord's vcsim launcher (main.go) from Debian's govmomi sources, offline.
# Needs the Debian packages golang-go and golang-github-vmware-govmomi-dev.
# Output: ../.build/vcsim (relative to this script); skipped when it is newer than main.go.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out_dir=$(cd "$here/.." && pwd)/.build
binary=$out_dir/vcsim
if [ -x "$binary" ] && [ -z "$(find "$here" -name "*.go" -newer "$binary")" ]; then
    echo "$binary"
    exit 0
fi
go=${GO:-go}
command -v "$go" >/dev/null 2>&1 || { echo "build.sh: go not found (apt-get install golang-go)" >&2; exit 1; }
gocode=${GOVMOMI_GOPATH:-/usr/share/gocode}
[ -d "$gocode/src/github.com/vmware/govmomi/simulator" ] || {
    echo "build.sh: $gocode/src/github.com/vmware/govmomi/simulator missing (apt-get install golang-github-vmware-govmomi-dev)" >&2
    exit 1
}
mkdir -p "$out_dir/gocache"
# GOPATH mode against Debian's source tree is what lets this build without the module proxy.
cd "$here"
GOPATH=$gocode GO111MODULE=off GOPROXY=off GOFLAGS= GOCACHE=$out_dir/gocache \
    "$go" build -o "$binary.$$" .
# rename is atomic: a parallel build or a running test never sees a half-written binary
mv -f "$binary.$$" "$binary"
echo "$binary"
