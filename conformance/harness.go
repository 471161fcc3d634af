// Package conformance holds the suite every rollcall backend passes:
// RunConformanceTests runs it against a Harness that gives fresh clients of
// a real registry server and controls over that server's faults.
//
// A backend's test calls it like this:
//
//	func TestConformance(t *testing.T) {
//		conformance.RunConformanceTests(t, func(ctx context.Context, t *testing.T) (conformance.Harness, error) {
//			return newHarness(ctx, t) // starts a real server for this subtest
//		})
//	}
//
// A fault control the backend cannot offer returns an error wrapping
// ErrUnsupported that says why; the subtests that need it are skipped with
// that reason.
package conformance

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// ErrUnsupported is wrapped by the errors of fault controls a harness cannot
// provide. The error's text is the reason given in the skip.
var ErrUnsupported = errors.New("conformance: unsupported")

// Harness gives clients of one real registry server and controls over it.
// RunConformanceTests makes one Harness per subtest and closes it at the
// end of the subtest.
type Harness interface {
	// MakeRegistry returns a new client of the server, as a separate process
	// would have, whose registrations are bound to leases of the given TTL.
	MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error)
	// Crash stops r as a crashed process stops: no deregistration, no lease
	// revocation, no further keepalives. r was made by MakeRegistry.
	Crash(r registry.Registry) error

	// URLs returns a URL that opens a client of the server with
	// registry.Open, and malformed or unsupported URLs of the same scheme
	// that Open must reject with registry.ErrInvalidURL.
	URLs() (good string, bad []string)

	// PauseServer freezes the server (process stopped with SIGSTOP, or its
	// connections black-holed); ResumeServer undoes it.
	PauseServer(ctx context.Context) error
	ResumeServer(ctx context.Context) error
	// StopServer stops the server, keeping its data; StartServer starts it
	// again. With wipe, the data is gone when it starts again.
	StopServer(ctx context.Context) error
	StartServer(ctx context.Context, wipe bool) error
	// RevokeLeases ends every registration's lease, TTL check or session on
	// the server, behind the registrars' backs.
	RevokeLeases(ctx context.Context) error
	// DeleteInstance deletes one instance's entry as another client would.
	DeleteInstance(ctx context.Context, service, id string) error
	// WriteGarbage writes entries under service that are not valid
	// instances (undecodable values, bad addresses, wrong service), as a
	// careless client would.
	WriteGarbage(ctx context.Context, service string) error

	// Close releases what the harness started.
	Close()
}

// HarnessMaker makes a Harness for one subtest.
type HarnessMaker func(ctx context.Context, t *testing.T) (Harness, error)

func skipIfUnsupported(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrUnsupported) {
		t.Skipf("backend cannot do this: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// Optional harness capabilities, found by type assertion. A subtest that
// needs one the harness lacks is skipped, saying which.

// NamespaceMaker makes clients of the same server scoped to a namespace: an
// etcd key prefix, a Consul namespace or datacenter, a Nacos namespace or
// group, a Kubernetes namespace. Registries in different namespaces never
// see each other's instances, also when one namespace's name is a prefix of
// the other's ("team-a" and "team-ab").
type NamespaceMaker interface {
	MakeRegistryIn(ctx context.Context, ttl time.Duration, namespace string) (registry.Registry, error)
}

// RestrictedMaker makes a client whose credentials are valid but do not
// allow it to register or read instances: an etcd user without a role, a
// Consul ACL token without service rights, a Kubernetes identity without
// RBAC on the resources the backend uses.
type RestrictedMaker interface {
	MakeRestrictedRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error)
}

// ConnectionBound is implemented by harnesses whose registrations belong to
// the client's connection (Nacos 2.x ephemeral instances): a server that
// restarts, even with its data kept, knows no instance until each
// registrar has reconnected and registered again, so the first list after a
// restart may be short. Subtests then require the exact list eventually
// instead of in the first update.
type ConnectionBound interface {
	RegistrationsAreConnectionBound() bool
}

func connectionBound(h Harness) bool {
	cb, ok := h.(ConnectionBound)
	return ok && cb.RegistrationsAreConnectionBound()
}

// ServicesOutliveInstances is implemented by harnesses whose server keeps
// listing a service for a while after its last instance is gone (Nacos
// keeps an empty service until its cleaner removes it, a minute or more).
// ServicesListsServicesWithInstances then requires only that Lookup finds
// no instance of it.
type ServicesOutliveInstances interface {
	ServicesOutliveInstances() bool
}

// AddressOnly is implemented by harnesses whose registry stores an address
// and nothing else per instance (the etcd backend's go-zero layout:
// go-zero's values are a plain host:port). The suite then registers
// instances without metadata, changes their address where it would change
// their metadata, and skips the subtests about metadata and the cluster
// properties, saying why.
type AddressOnly interface {
	InstancesAreAddressOnly() bool
}

func addressOnly(h Harness) bool {
	ao, ok := h.(AddressOnly)
	return ok && ao.InstancesAreAddressOnly()
}
