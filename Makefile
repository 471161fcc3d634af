# rollcall: the two commands a newcomer needs.
#   make demo   runs the demo (embedded etcd, gRPC servers, a client that survives faults)
#   make test   builds the real servers the tests use (cached per user), runs every test under
#               -race against them as child processes (the root module, then the interop
#               module: go-zero, kratos, etcd's resolver), then the conformance suites again
#               against the same servers in containers (testcontainers-go; images built locally)

GO ?= go
TEST_TIMEOUT ?= 60m

.PHONY: test test-interop demo servers vet bench

include mk/containers.mk

# The interop module (interop/, a module of its own so that go-zero's and
# kratos' dependencies never reach the users' module graph) is not in
# ./... of the root module: it is run explicitly.
INTEROP_TEST_TIMEOUT ?= 15m

test: servers vet
	$(GO) test -race -count=1 -p 2 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) test-interop
	$(MAKE) test-containers

test-interop:
	cd interop && $(GO) test -race -count=1 -timeout $(INTEROP_TEST_TIMEOUT) ./...

servers:
	bash scripts/build-servers.sh all

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	cd interop && $(GO) vet ./...

demo:
	$(GO) run ./cmd/rollcall demo

bench: servers
	$(GO) test -run '^$$' -bench . -benchmem -timeout 30m ./backends/etcd/ ./grpcresolver/
