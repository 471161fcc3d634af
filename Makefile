# rollcall: the two commands a newcomer needs.
#   make demo   runs the demo (embedded etcd, gRPC servers, a client that survives faults)
#   make test   builds the real servers the tests use (cached per user), runs every test under
#               -race against them as child processes, then the conformance suites again
#               against the same servers in containers (testcontainers-go; images built locally)

GO ?= go
TEST_TIMEOUT ?= 60m

.PHONY: test demo servers vet bench

include mk/containers.mk

test: servers vet
	$(GO) test -race -count=1 -p 2 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) test-containers

servers:
	bash scripts/build-servers.sh all

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...

demo:
	$(GO) run ./cmd/rollcall demo

bench: servers
	$(GO) test -run '^$$' -bench . -benchmem -timeout 30m ./backends/etcd/ ./grpcresolver/
