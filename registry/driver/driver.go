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
//   - ServiceLister: Services(ctx) lists the services that have instances.
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
	// are already published by this backend replaces it. An entry of the
	// same service and ID held by another live registrar (another process,
	// lease or session) under a different address is not overwritten:
	// Publish fails with an error wrapping registry.ErrConflict. Under the
	// same address it is the same endpoint (a restarted process), and
	// Publish takes it over.
	//
	// Errors: registry.ErrUnavailable wrapping the cause when the server
	// cannot be reached, registry.ErrPermission for authentication and
	// authorization failures; context errors pass through.
	Publish(ctx context.Context, inst Instance) (Publication, error)

	// List returns the instances of service that are currently alive. An
	// empty result with a nil error means the service has no instances.
	List(ctx context.Context, service string) ([]Instance, error)

	// Watch opens a watch on service. The stream's first event is a Reset.
	// ctx bounds opening the watch only (the shared layer gives it a
	// deadline); the stream lives until Close, never tied to ctx.
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
	// publication holds. It is called on Deregister or Close and, when it
	// fails, again until it succeeds or the registry closes (so it must be
	// safe to repeat); it returns nil once the instance is gone. It is called
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

// Event is what a Stream yields: either a Reset (the complete list) or a
// batch of Changes applied in the order given. Make them with ResetEvent and
// ChangeEvent; the zero Event is an authoritative empty Reset.
//
// The shape cannot express an ambiguous batch: a key deleted and created
// again in one server response is two Changes, in order, and the shared
// layer applies them in that order, so the instance ends present (and a
// watcher sees at most a Changed, never a removal).
type Event struct {
	// Reset means Instances is the complete list of instances; every
	// instance not in it is gone. A Reset with no Instances is an
	// authoritative empty list. Changes is empty on a Reset.
	Reset bool
	// Instances is the complete list, on a Reset only.
	Instances []Instance
	// Changes are what happened, oldest first, when Reset is false.
	Changes []Change
}

// Change is one instance's new state: Put (Instance set) or Delete
// (Instance nil).
type Change struct {
	// ID is the instance ID the change is about.
	ID string
	// Instance is the new value, whose ID is ID; nil when the instance is
	// gone. A Put of a value that does not validate (garbage written by
	// someone else) removes the instance from watchers.
	Instance *Instance
}

// Put is the Change "inst is now this value".
func Put(inst Instance) Change { return Change{ID: inst.ID, Instance: &inst} }

// Delete is the Change "the instance with this ID is gone".
func Delete(id string) Change { return Change{ID: id} }

// ResetEvent is a Reset: list is the complete list of instances.
func ResetEvent(list []Instance) Event { return Event{Reset: true, Instances: list} }

// ChangeEvent is a batch of changes, applied in order.
func ChangeEvent(changes ...Change) Event { return Event{Changes: changes} }

// Pinger is implemented by backends that can check that their server is
// reachable.
type Pinger interface {
	Ping(ctx context.Context) error
}

// InstanceChecker is implemented by backends that cannot store every valid
// instance (an etcd layout that keeps only the address, say). CheckInstance
// returns an error wrapping registry.ErrInvalidInstance for an instance that
// Publish and Update would refuse, without a call to the server. Package
// registry calls it in Register and Update, so that such an instance is
// refused at once, also while the registration is being registered again
// (when Update only stores the new value for the next attempt), rather than
// failing every later attempt.
type InstanceChecker interface {
	CheckInstance(inst Instance) error
}

// ServiceLister is implemented by backends that can list the services of
// their registry (in the backend's prefix or namespace), as `etcdctl get
// --prefix`, `consul catalog services` or `kubectl get svc` do. Services
// returns the service names, each once, in any order; a service whose
// instances are all gone is left out where the backend can tell. Names that
// are not valid rollcall service names are skipped by package registry.
type ServiceLister interface {
	Services(ctx context.Context) ([]string, error)
}

// DefaultTTL is the registration TTL used when none is given.
const DefaultTTL = 10 * time.Second
