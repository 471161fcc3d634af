package grpcresolver

import (
	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/registry"
)

// OpenRegistries returns how many registries a builder made by NewBuilder
// holds open.
func OpenRegistries(b resolver.Builder) int { return b.(*builder).openRegistries() }

// WatchStale reports whether the resolver's registry watch last said stale.
func WatchStale(r resolver.Resolver) bool {
	g := r.(*grpcResolver)
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stale
}

// HintsServed returns how many ResolveNow hints the resolver has served
// (with a relist, or with none for a live watch).
func HintsServed(r resolver.Resolver) int64 { return r.(*grpcResolver).hints.Load() }

// Relists returns how many relists the resolver has begun.
func Relists(r resolver.Resolver) int64 { return r.(*grpcResolver).relists.Load() }

// EndpointOf returns the endpoint the resolver pushes for in.
func EndpointOf(in registry.Instance) resolver.Endpoint { return newEntry(in, true).ep }
