// Package interop holds the tests of rollcall against the libraries of
// other frameworks, in a module of its own so that their dependencies never
// reach the module graph of rollcall's users:
//
//   - go-zero (github.com/zeromicro/go-zero v1.10.3): its core/discov
//     Publisher and Subscriber and its zrpc client against the etcd
//     backend's go-zero layout, and one binary that links zrpc's gRPC
//     resolvers and rollcall's grpcresolver;
//   - kratos (github.com/go-kratos/kratos/v2 v2.8.3 and
//     contrib/registry/etcd/v2): its etcd Registry against the kratos layout;
//   - etcd's own gRPC resolver (go.etcd.io/etcd/client/v3/naming/resolver)
//     reading rollcall's default layout.
//
// Every test runs against a real etcd (internal/testserver, the binary
// scripts/build-servers.sh builds). Run them with `make test`, or
// `cd interop && go test -race ./...`.
package interop
