// Package driver defines the small interface a rollcall backend implements.
//
// Application code should use package registry, not this package. A backend
// supplies primitives only: publishing an instance with a TTL and telling when
// that publication is lost, listing a service, and a watch stream of resets and
// changes. Supervised re-registration, watch restarts, freezing of the last
// known list while the backend is unreachable, diffing, coalescing and
// validation live once, in package registry, and every backend gets them by
// handing its Backend to registry.New.
//
// Optional capabilities are discovered by type assertion:
//
//   - Pinger: Ping(ctx) checks that the backend is reachable.
package driver

import (
	"context"
	"time"
)

// Instance is one registered endpoint of a service. It has the same fields as
// registry.Instance, so the two convert into each other directly.
type Instance struct {
	Service  string
	ID       string
	Addr     string
	Metadata map[string]string
}

// Backend is what a backend implements. Its methods may be called
// concurrently. Errors returned for an unreachable backend must wrap the
// underlying cause; context.Canceled and context.DeadlineExceeded pass
// through unchanged.
type Backend interface {
	// Publish makes inst visible, tied to the backend's liveness mechanism
	// (lease, TTL check, connection, Lease object), and keeps it alive until
	// the publication is withdrawn or lost. It returns once the instance is
	// visible to List and Watch. Publishing an instance whose service and ID
	// are already published by this backend replaces it.
	Publish(ctx context.Context, inst Instance) (Publication, error)

	// List returns the instances of service that are currently alive. An
	// empty result with a nil error means the service has no instances.
	List(ctx context.Context, service string) ([]Instance, error)

	// Watch opens a watch on service. The stream's first event is a Reset.
	Watch(ctx context.Context, service string) (Stream, error)

	// Close releases the backend's resources. Publications still held are
	// withdrawn by package registry before Close is called. Close is called
	// once.
	Close() error
}

// Publication is one published instance.
type Publication interface {
	// Lost is closed when the backend knows the publication is gone: the
	// lease or session expired or could not be renewed, the entry was
	// deleted by someone else, the connection it was bound to ended.
	Lost() <-chan struct{}
	// Err tells why the publication was lost; nil while it is not.
	Err() error
	// Update replaces the published instance (same service and ID) with inst.
	Update(ctx context.Context, inst Instance) error
	// Withdraw removes the instance from the registry and releases what the
	// publication holds. It is called at most once: on Deregister or Close,
	// for the live publication or, if the registration was lost and not yet
	// published again, for the lost one (whose remains it should remove if
	// they are still there). A lost publication that gets replaced by a new
	// Publish of the same instance is dropped without Withdraw, because its
	// entry may still be valid on the server: the backend releases what it
	// held when it reports the loss or when the new Publish replaces it.
	Withdraw(ctx context.Context) error
}

// Stream is an open watch on one service.
type Stream interface {
	// Next blocks until the next event. The first event is a Reset. Next
	// returns an error when the watch has failed (the caller then closes the
	// stream and opens a new one) or ctx is done.
	Next(ctx context.Context) (Event, error)
	// Close ends the watch, on the server too. It is safe to call more than once.
	Close() error
}

// Event is what a Stream yields.
type Event struct {
	// Reset means Upserts is the complete list of instances; every instance
	// not in it is gone. A Reset with no Upserts is an authoritative empty list.
	Reset bool
	// Upserts are added or changed instances.
	Upserts []Instance
	// Deletes are the IDs of removed instances. Empty on a Reset.
	Deletes []string
}

// Pinger is implemented by backends that can check that their server is
// reachable.
type Pinger interface {
	Ping(ctx context.Context) error
}

// DefaultTTL is the registration TTL used when none is given.
const DefaultTTL = 10 * time.Second
