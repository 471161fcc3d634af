#!/usr/bin/env bash
# Build tiny local Docker images (FROM scratch, one static binary each) of the
# servers the conformance suite runs in containers, for machines where no
# image registry is reachable:
#
#   rollcall-test/etcd:<version>       etcd, built by scripts/build-servers.sh
#   rollcall-test/consul:<version>     consul, built by scripts/build-servers.sh
#   rollcall-test/toxiproxy:<version>  toxiproxy-server (the partition tests' proxy),
#                                      built here from tools/servers/toxiproxy
#   rollcall-test/kube-apiserver:<version>  kube-apiserver, built by scripts/build-servers.sh
#   rollcall-test/nacos-test-server:<hash>  the project's Nacos 2.x protocol server
#                                      (internal/testserver/nacosserver/cmd/nacos-test-server);
#                                      needs only Go and Docker, so CI builds it too
#
# The binaries sit at the paths of the official images (and the images have
# the same entrypoints), so the tests run either. An image that is already
# there is not rebuilt; a binary that is already in the cache is not rebuilt.
#
# Usage: scripts/build-images.sh [--env] [etcd|consul|toxiproxy|kube-apiserver|nacos-test-server|all]...  (default: all)
#   --env  print, on stdout, the `export ROLLCALL_..._IMAGE=...` lines that make
#          the tests use these images (progress goes to stderr), e.g.
#          eval "$(scripts/build-images.sh --env)"
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ROLLCALL_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rollcall/servers}
export GOWORK=off
export CGO_ENABLED=0

log() { echo "build-images: $*" >&2; }

usage() {
	echo "usage: $0 [--env] [etcd|consul|toxiproxy|kube-apiserver|nacos-test-server|all]..." >&2
	exit 2
}

# version_of NAME MODULE: the version of MODULE required by tools/servers/NAME/go.mod.
version_of() {
	local gomod=$repo_root/tools/servers/$1/go.mod version
	version=$(awk -v m="$2" '
		$1 == "require" && $2 == m { print $3; exit }
		$1 == m && $2 ~ /^v/ { print $2; exit }
	' "$gomod")
	[[ -n $version ]] || {
		log "no version of $2 in $gomod"
		exit 1
	}
	echo "$version"
}

# binary NAME: path of the cached static binary, building it if needed.
binary() {
	local name=$1 version bin tmp
	case $name in
	etcd | consul | kube-apiserver)
		# build-servers.sh owns these; it skips what is cached.
		bash "$repo_root/scripts/build-servers.sh" "$name" >&2
		case $name in
		etcd) version=$(version_of etcd go.etcd.io/etcd/server/v3) ;;
		consul) version=$(version_of consul github.com/hashicorp/consul) ;;
		kube-apiserver) version=$(version_of kube-apiserver k8s.io/kubernetes) ;;
		esac
		echo "$cache/$name-$version/$name"
		;;
	toxiproxy)
		version=$(version_of toxiproxy github.com/Shopify/toxiproxy/v2)
		bin=$cache/toxiproxy-$version/toxiproxy
		if [[ ! -x $bin ]]; then
			mkdir -p "$(dirname "$bin")"
			tmp=$(mktemp "$(dirname "$bin")/.toxiproxy.XXXXXX")
			log "toxiproxy $version: building tools/servers/toxiproxy -> $bin"
			(cd "$repo_root/tools/servers/toxiproxy" &&
				go build -mod=readonly -trimpath -buildvcs=false -ldflags "-s -w" \
					-o "$tmp" github.com/Shopify/toxiproxy/v2/cmd/server) || {
				rm -f "$tmp"
				exit 1
			}
			chmod 0755 "$tmp"
			mv -f "$tmp" "$bin"
		fi
		echo "$bin"
		;;
	nacos-test-server)
		# The project's own Nacos 2.x protocol server: versioned by a hash of
		# its sources and of the root module's requirements.
		version=$(cd "$repo_root" &&
			cat go.mod go.sum $(find internal/testserver/nacosserver -name '*.go' ! -name '*_test.go' | LC_ALL=C sort) |
			sha256sum | cut -c1-12)
		bin=$cache/nacos-test-server-$version/nacos-test-server
		if [[ ! -x $bin ]]; then
			mkdir -p "$(dirname "$bin")"
			tmp=$(mktemp "$(dirname "$bin")/.nacos-test-server.XXXXXX")
			log "nacos-test-server $version: building ./internal/testserver/nacosserver/cmd/nacos-test-server -> $bin"
			(cd "$repo_root" &&
				go build -mod=readonly -trimpath -buildvcs=false -ldflags "-s -w" \
					-o "$tmp" ./internal/testserver/nacosserver/cmd/nacos-test-server) || {
				rm -f "$tmp"
				exit 1
			}
			chmod 0755 "$tmp"
			mv -f "$tmp" "$bin"
		fi
		echo "$bin"
		;;
	esac
}

# image NAME: build rollcall-test/NAME:VERSION unless present; print its tag.
image() {
	local name=$1 bin version tag ctx
	bin=$(binary "$name")
	version=$(basename "$(dirname "$bin")")
	version=${version#"$name"-}
	tag=rollcall-test/$name:$version
	if docker image inspect "$tag" >/dev/null 2>&1; then
		log "$tag: present"
		echo "$tag"
		return
	fi
	ctx=$work/$name
	mkdir -p "$ctx"
	# A hard link when possible: the build context is sent to the engine anyway.
	ln "$bin" "$ctx/$name" 2>/dev/null || cp "$bin" "$ctx/$name"
	case $name in
	etcd)
		cat >"$ctx/Dockerfile" <<-'EOF'
			FROM scratch
			COPY etcd /usr/local/bin/etcd
			EXPOSE 2379 2380
			CMD ["/usr/local/bin/etcd"]
		EOF
		;;
	consul)
		cat >"$ctx/Dockerfile" <<-'EOF'
			FROM scratch
			COPY consul /bin/consul
			EXPOSE 8500 8300 8301 8302
			ENTRYPOINT ["/bin/consul"]
			CMD ["agent", "-dev", "-client", "0.0.0.0"]
		EOF
		;;
	kube-apiserver)
		cat >"$ctx/Dockerfile" <<-'EOF'
			FROM scratch
			COPY kube-apiserver /usr/local/bin/kube-apiserver
			EXPOSE 6443
			ENTRYPOINT ["/usr/local/bin/kube-apiserver"]
		EOF
		;;
	nacos-test-server)
		cat >"$ctx/Dockerfile" <<-'EOF'
			FROM scratch
			COPY nacos-test-server /nacos-test-server
			EXPOSE 8848 9848 18848
			ENTRYPOINT ["/nacos-test-server"]
		EOF
		;;
	toxiproxy)
		cat >"$ctx/Dockerfile" <<-'EOF'
			FROM scratch
			COPY toxiproxy /toxiproxy
			EXPOSE 8474
			ENTRYPOINT ["/toxiproxy"]
			CMD ["-host=0.0.0.0"]
		EOF
		;;
	esac
	log "$tag: docker build from $bin"
	docker build --quiet --label dev.rollcall.test.image=1 -t "$tag" "$ctx" >&2
	echo "$tag"
}

env_var() {
	case $1 in
	etcd) echo ROLLCALL_ETCD_IMAGE ;;
	consul) echo ROLLCALL_CONSUL_IMAGE ;;
	toxiproxy) echo ROLLCALL_TOXIPROXY_IMAGE ;;
	kube-apiserver) echo ROLLCALL_KUBE_APISERVER_IMAGE ;;
	nacos-test-server) echo ROLLCALL_NACOS_IMAGE ;;
	esac
}

print_env=false
names=()
for arg in "$@"; do
	case $arg in
	--env) print_env=true ;;
	all) names+=(etcd consul toxiproxy kube-apiserver nacos-test-server) ;;
	etcd | consul | toxiproxy | kube-apiserver | nacos-test-server) names+=("$arg") ;;
	*) usage ;;
	esac
done
[[ ${#names[@]} -gt 0 ]] || names=(etcd consul toxiproxy kube-apiserver nacos-test-server)

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

command -v docker >/dev/null || {
	log "docker is not on PATH"
	exit 1
}
docker version --format '{{.Server.Version}}' >/dev/null || {
	log "the Docker engine does not answer (docker version failed)"
	exit 1
}
for name in "${names[@]}"; do
	tag=$(image "$name")
	if $print_env; then
		echo "export $(env_var "$name")=$tag"
	fi
done
