# rollcall: the two commands a newcomer needs.
#   make demo   runs the demo (embedded etcd, gRPC servers, a client that survives faults)
#   make test   builds the real servers the tests use (cached per user) and runs every test under -race

GO ?= go
TEST_TIMEOUT ?= 60m

.PHONY: test demo servers vet bench

test: servers vet
	$(GO) test -race -p 2 -timeout $(TEST_TIMEOUT) ./...

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
