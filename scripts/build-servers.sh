#!/usr/bin/env bash
# Build the real servers that the integration tests run as child processes
# (etcd, consul, kube-apiserver) from the wrapper modules under tools/servers/,
# into a per-user cache directory keyed by version, outside the checkout:
#
#   ${ROLLCALL_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rollcall/servers}/<name>-<version>/<name>
#
# A binary that is already there is not rebuilt. The cache also gets
# kubebuilder-assets/ with symlinks etcd and kube-apiserver, for
# controller-runtime's envtest (KUBEBUILDER_ASSETS).
#
# Needs only Go and the Go module proxy. internal/testserver/bins.go applies the
# same cache rule; its version table must match the wrappers' go.mod files.
#
# Usage: scripts/build-servers.sh [etcd|consul|kube-apiserver|all]...  (default: all)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ROLLCALL_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rollcall/servers}

# The wrapper modules are separate modules: never let a go.work pull them in.
export GOWORK=off
export CGO_ENABLED=0

usage() {
	echo "usage: $0 [etcd|consul|kube-apiserver|all]..." >&2
	exit 2
}

# module_of NAME: the Go module whose version names the binary.
module_of() {
	case $1 in
	etcd) echo go.etcd.io/etcd/server/v3 ;;
	consul) echo github.com/hashicorp/consul ;;
	kube-apiserver) echo k8s.io/kubernetes ;;
	*) usage ;;
	esac
}

# version_of NAME: the version of that module required by the wrapper's go.mod.
version_of() {
	local name=$1 mod gomod version
	mod=$(module_of "$name")
	gomod=$repo_root/tools/servers/$name/go.mod
	# Matches both "require M vX" and a "M vX" line inside a require block.
	version=$(awk -v m="$mod" '
		$1 == "require" && $2 == m { print $3; exit }
		$1 == m && $2 ~ /^v/ { print $2; exit }
	' "$gomod")
	if [[ -z $version ]]; then
		echo "build-servers: no version of $mod in $gomod" >&2
		exit 1
	fi
	echo "$version"
}

# ldflags_of NAME VERSION: extra linker flags (version stamping).
ldflags_of() {
	local name=$1 version=$2 flags="-s -w"
	if [[ $name == kube-apiserver ]]; then
		local v=${version#v} pkg=k8s.io/component-base/version
		local major=${v%%.*} rest=${v#*.}
		local minor=${rest%%.*}
		flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
		flags+=" -X $pkg.gitTreeState=clean"
	fi
	echo "$flags"
}

tmp_files=()
cleanup() {
	local f
	for f in "${tmp_files[@]+"${tmp_files[@]}"}"; do
		rm -f -- "$f"
	done
}
trap cleanup EXIT

# build NAME: build the binary unless it is already in the cache.
build() {
	local name=$1 version dir bin tmp flags start elapsed
	version=$(version_of "$name")
	dir=$cache/$name-$version
	bin=$dir/$name
	if [[ -x $bin ]]; then
		echo "build-servers: $name $version: cached at $bin"
		return 0
	fi
	mkdir -p "$dir"
	tmp=$(mktemp "$dir/.$name.XXXXXX")
	tmp_files+=("$tmp")
	flags=$(ldflags_of "$name" "$version")
	echo "build-servers: $name $version: building tools/servers/$name -> $bin (go $(go env GOVERSION), CGO_ENABLED=0 -trimpath)"
	start=$SECONDS
	(cd "$repo_root/tools/servers/$name" &&
		go build -mod=readonly -trimpath -buildvcs=false -ldflags "$flags" -o "$tmp" .)
	chmod 0755 "$tmp"
	mv -f -- "$tmp" "$bin"
	elapsed=$((SECONDS - start))
	echo "build-servers: $name $version: built in $((elapsed / 60))m$((elapsed % 60))s ($(du -h "$bin" | cut -f1))"
}

# link_asset NAME: point kubebuilder-assets/NAME at the cached binary, if built.
link_asset() {
	local name=$1 version target assets link
	[[ -f $repo_root/tools/servers/$name/go.mod ]] || return 0
	version=$(version_of "$name")
	target=../$name-$version/$name
	assets=$cache/kubebuilder-assets
	link=$assets/$name
	[[ -x $cache/$name-$version/$name ]] || return 0
	mkdir -p "$assets"
	if [[ -L $link && $(readlink "$link") == "$target" ]]; then
		return 0
	fi
	# Replace atomically: a fresh symlink renamed over the old entry.
	ln -sfn "$target" "$link.tmp.$$"
	mv -f "$link.tmp.$$" "$link"
	echo "build-servers: $link -> $target"
}

names=()
[[ $# -gt 0 ]] || set -- all
for arg in "$@"; do
	case $arg in
	all) names+=(etcd consul kube-apiserver) ;;
	etcd | consul | kube-apiserver) names+=("$arg") ;;
	-h | --help) usage ;;
	*) usage ;;
	esac
done

command -v go >/dev/null || {
	echo "build-servers: go is not on PATH" >&2
	exit 1
}
echo "build-servers: cache $cache"
for name in "${names[@]}"; do
	build "$name"
done
# Keep the envtest assets dir up to date with whatever is built.
link_asset etcd
link_asset kube-apiserver
