package grpcresolver

import "google.golang.org/grpc/resolver"

// OpenRegistries returns how many registries a builder made by NewBuilder
// holds open.
func OpenRegistries(b resolver.Builder) int { return b.(*builder).openRegistries() }
