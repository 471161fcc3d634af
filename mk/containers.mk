# The conformance suite through testcontainers-go (included by the Makefile;
# uses its GO variable).
#
#   make images           build the local FROM-scratch images of the servers
#                         (rollcall-test/etcd, consul, toxiproxy, ...) from the
#                         binaries scripts/build-servers.sh builds; skips what exists
#   make test-containers  run every backend's conformance suite, and the partition
#                         tests, against servers in containers made from those images
#
# Without a working Docker engine test-containers says so and does nothing,
# unless ROLLCALL_REQUIRE_DOCKER=1 (then it fails). To use other images (the
# official ones, say), run go test directly: see docs/CI.md.

CONTAINERS_TEST_TIMEOUT ?= 30m
CONTAINERS_TEST_RUN ?= Conformance|Partition|Faults
# The packages whose harnesses run their servers in containers.
CONTAINERS_TEST_PKGS ?= ./backends/etcd/ ./backends/consul/ ./backends/k8s/ ./backends/nacos/ ./internal/testserver/containers/

.PHONY: images test-containers

images:
	bash scripts/build-images.sh

test-containers:
	@if ! docker info >/dev/null 2>&1; then \
		if [ "$${ROLLCALL_REQUIRE_DOCKER:-}" = 1 ]; then \
			echo "test-containers: no Docker engine (docker info failed)" >&2; exit 1; \
		fi; \
		echo "test-containers: SKIPPED: no Docker engine answers (docker info failed); set ROLLCALL_REQUIRE_DOCKER=1 to fail instead"; \
		exit 0; \
	fi; \
	set -e; eval "$$(bash scripts/build-images.sh --env)"; \
	export TESTCONTAINERS_RYUK_DISABLED=true ROLLCALL_TEST_SERVERS=containers; \
	$(GO) test -race -count=1 -p 2 -timeout $(CONTAINERS_TEST_TIMEOUT) -run '$(CONTAINERS_TEST_RUN)' $(CONTAINERS_TEST_PKGS)
