// Package registry is rollcall's user API for service registration and
// discovery, the same over every backend.
//
// A server registers itself ("user.rpc is at 10.0.0.7:8080") with Register and
// keeps the returned Registration until it exits; a supervisor keeps the
// instance registered through lease loss, registry restarts and deletions by
// others. A client reads the live instances with Lookup, or follows them with
// Watch: a Watcher delivers a full snapshot first, then each change with the
// added, changed and removed instances. While the registry is unreachable a
// Watcher keeps the last known list and says it is stale; it never empties or
// shrinks the list because of an error.
//
// Backends register a URL scheme when their package is imported:
//
//	import _ "github.com/rollcall-go/rollcall/backends/etcd"
//
//	reg, err := registry.Open(ctx, "etcd://127.0.0.1:2379/?ttl=10s")
//
// Backend authors implement package registry/driver and call New.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/metric"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Registrar registers instances.
type Registrar interface {
	// Register publishes inst and returns once it is visible to Lookup and
	// Watch. From then on a supervisor keeps it registered until Deregister
	// or Close. ctx bounds only the first publication.
	Register(ctx context.Context, inst Instance) (*Registration, error)
}

// Discoverer finds instances.
type Discoverer interface {
	// Lookup returns the live instances of service, sorted by ID. An empty
	// list with a nil error means the service has no instances.
	Lookup(ctx context.Context, service string) ([]Instance, error)
	// Watch follows the instances of service. It does not block on the
	// network: the first Watcher.Next delivers the first snapshot. ctx bounds
	// the watch's life as Close does.
	Watch(ctx context.Context, service string) (*Watcher, error)
}

// Registry is a Registrar and a Discoverer over one backend. Implementations
// returned by Open and New are safe for concurrent use.
type Registry interface {
	Registrar
	Discoverer
	// Ping checks that the registry server answers.
	Ping(ctx context.Context) error
	// Services returns the names of the services that have instances in
	// the registry (under its prefix or namespace), sorted. A backend that
	// cannot tell cheaply may list a service whose instances are all gone;
	// Lookup then returns none. A backend that cannot list services at all
	// returns an error wrapping errors.ErrUnsupported.
	Services(ctx context.Context) ([]string, error)
	// Close deregisters what is still registered (bounded by a few seconds),
	// stops every Watcher and releases the backend. It is idempotent; after it
	// every method returns ErrClosed.
	Close() error
}

// Options configure the shared layer that New puts over a backend.
type Options struct {
	// Logger receives the registry's log lines; slog.Default() when nil.
	Logger *slog.Logger
	// Backoff bounds the retry delays of re-registration and watch restarts.
	// The zero value means 100ms to 10s, jittered.
	Backoff Backoff
	// CallTimeout bounds every call the shared layer makes to the backend
	// (Register's publication, Lookup, Ping, Services, opening a watch, Update,
	// re-registration, withdrawal), together with the caller's context
	// where there is one; 5s when zero. A call that gets no answer within
	// it fails with ErrUnavailable.
	CallTimeout time.Duration
	// ResyncGrace is how long a Watcher that resynchronises after an
	// outage stays Stale while instances it knew before the outage are
	// missing from the registry: a lease that expired during the outage is
	// usually renewed or re-registered within moments of the registry
	// coming back, and holding those removals back for this long keeps
	// such an instance from being delivered as removed and then added
	// again. Instances still missing when it ends are removed. 3s when
	// zero; a negative value turns it off.
	ResyncGrace time.Duration
	// CloseTimeout bounds the deregistrations done by Close; 5s when zero.
	CloseTimeout time.Duration
	// MeterProvider, when not nil, receives the registry's metrics through
	// the OpenTelemetry metric API (see the rollcall.* instruments in
	// metrics.go); nil records none.
	MeterProvider metric.MeterProvider
	// Snapshot, when its Dir is set, keeps each watched list on disk for
	// Watchers that start while the registry is down (see Snapshot). Open
	// sets it from the URL parameters snapshot=DIR, snapshot_max_age and
	// snapshot_wait, which every scheme accepts.
	Snapshot Snapshot
}

// New returns a Registry over a backend. Backend packages call it; application
// code uses Open or a backend's own constructor.
func New(b driver.Backend, opts *Options) Registry {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	o.Backoff = o.Backoff.withDefaults()
	if o.CallTimeout <= 0 {
		o.CallTimeout = 5 * time.Second
	}
	if o.CloseTimeout <= 0 {
		o.CloseTimeout = 5 * time.Second
	}
	if o.ResyncGrace == 0 {
		o.ResyncGrace = 3 * time.Second
	}
	o.Snapshot = o.Snapshot.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	r := &registry{b: b, opts: o, log: o.Logger, ctx: ctx, cancel: cancel, regs: map[*Registration]struct{}{},
		byKey: map[[2]string]*Registration{}, watchers: map[*Watcher]struct{}{}, feeds: map[string]*feed{}}
	met, err := newMetrics(r, o.MeterProvider)
	if err != nil {
		r.log.Error("registry: cannot make the metrics' instruments; recording none", "err", err)
	}
	r.met = met
	return r
}

type registry struct {
	b      driver.Backend
	opts   Options
	log    *slog.Logger
	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	met    *metrics // nil without Options.MeterProvider

	mu       sync.Mutex
	closed   bool
	regs     map[*Registration]struct{}
	byKey    map[[2]string]*Registration // live registrations by (service, ID), and Register calls in flight (nil)
	watchers map[*Watcher]struct{}
	feeds    map[string]*feed // the backend watch of each watched service, shared by its Watchers
	closeErr error
	wg       sync.WaitGroup
}

var _ Registry = (*registry)(nil)

func (r *registry) Register(ctx context.Context, inst Instance) (*Registration, error) {
	inst, err := r.normalize(inst)
	if err != nil {
		return nil, opErr("register", inst.Service, err)
	}
	key := [2]string{inst.Service, inst.ID}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, opErr("register", inst.Service, ErrClosed)
	}
	if _, dup := r.byKey[key]; dup {
		r.mu.Unlock()
		return nil, opErr("register", inst.Service, fmt.Errorf("%w: %s is registered by this Registry already (update it, or deregister it first)", ErrConflict, inst.String()))
	}
	r.byKey[key] = nil // reserved while the first publication is in flight
	r.wg.Add(1)        // held until the registration is tracked or abandoned
	r.mu.Unlock()
	defer r.wg.Done()

	c := r.begin(ctx, "publish")
	pub, err := r.b.Publish(c.ctx, driver.Instance(inst))
	err = c.end(err)
	if err != nil {
		r.mu.Lock()
		delete(r.byKey, key)
		r.mu.Unlock()
		return nil, opErr("register", inst.Service, err)
	}
	reg := newRegistration(r, inst, pub)
	r.mu.Lock()
	if r.closed {
		delete(r.byKey, key)
		r.mu.Unlock()
		wctx, cancel := context.WithTimeout(context.Background(), r.opts.CloseTimeout)
		defer cancel()
		_ = pub.Withdraw(wctx)
		return nil, opErr("register", inst.Service, ErrClosed)
	}
	r.regs[reg] = struct{}{}
	r.byKey[key] = reg
	r.wg.Add(1)
	r.mu.Unlock()
	go reg.supervise()
	r.log.Debug("registry: registered", "instance", inst.String())
	return reg, nil
}

// callCtx bounds one backend call: ctx, CallTimeout, and the registry's
// Close, whichever ends first.
func (r *registry) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, r.opts.CallTimeout)
	stop := context.AfterFunc(r.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// callErr turns the error of a call made with callCtx(parent) into what the
// caller sees: when the call ran out of CallTimeout while the caller's
// context was still live, the registry did not answer in time, which is
// ErrUnavailable (a backend that said more is kept as it said it).
func (r *registry) callErr(parent, cctx context.Context, err error) error {
	if err == nil || parent.Err() != nil || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrPermission) {
		return err
	}
	if r.ctx.Err() != nil {
		return ErrClosed
	}
	if cctx.Err() != nil && errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: no answer within %v: %w", ErrUnavailable, r.opts.CallTimeout, err)
	}
	return err
}

func (r *registry) forget(reg *Registration) {
	key := [2]string{reg.inst.Service, reg.inst.ID}
	r.mu.Lock()
	delete(r.regs, reg)
	if r.byKey[key] == reg {
		delete(r.byKey, key)
	}
	r.mu.Unlock()
}

func (r *registry) Lookup(ctx context.Context, service string) ([]Instance, error) {
	if err := ValidateServiceName(service); err != nil {
		return nil, opErr("lookup", service, err)
	}
	if r.isClosed() {
		return nil, opErr("lookup", service, ErrClosed)
	}
	c := r.begin(ctx, "list")
	list, err := r.b.List(c.ctx, service)
	err = c.end(err)
	if err != nil {
		return nil, opErr("lookup", service, err)
	}
	m := make(map[string]Instance, len(list))
	for _, di := range list {
		if in, ok := r.accept(service, di); ok {
			m[in.ID] = in
		}
	}
	return sortedValues(m), nil
}

// accept validates an instance read from the backend; bad data written by
// others is logged and skipped.
func (r *registry) accept(service string, di driver.Instance) (Instance, bool) {
	in := Instance(di)
	if in.Service != service {
		r.log.Warn("registry: skipping instance of another service", "want", service, "got", in.Service, "id", in.ID)
		return Instance{}, false
	}
	n, err := normalize(in)
	if err != nil {
		r.log.Warn("registry: skipping invalid instance read from the registry", "service", service, "id", in.ID, "err", err)
		return Instance{}, false
	}
	if !serving(n) {
		return Instance{}, false // registered, taking no calls (SetServing)
	}
	return n, true
}

func (r *registry) Watch(ctx context.Context, service string) (*Watcher, error) {
	if err := ValidateServiceName(service); err != nil {
		return nil, opErr("watch", service, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, opErr("watch", service, ErrClosed)
	}
	f := r.feeds[service]
	if f == nil {
		f = newFeed(r, service)
		r.feeds[service] = f
		r.wg.Add(1)
		go f.run()
	}
	w := f.subscribe()
	r.watchers[w] = struct{}{}
	// Close takes r.mu: a ctx that is done already closes w once Watch
	// has returned.
	w.stop = context.AfterFunc(ctx, func() { w.Close() })
	return w, nil
}

func (r *registry) Ping(ctx context.Context) error {
	if r.isClosed() {
		return opErr("ping", "", ErrClosed)
	}
	c := r.begin(ctx, "ping")
	var err error
	if p, ok := r.b.(driver.Pinger); ok {
		err = p.Ping(c.ctx)
	} else {
		_, err = r.b.List(c.ctx, "rollcall-ping")
	}
	return opErr("ping", "", c.end(err))
}

func (r *registry) Services(ctx context.Context) ([]string, error) {
	if r.isClosed() {
		return nil, opErr("services", "", ErrClosed)
	}
	sl, ok := r.b.(driver.ServiceLister)
	if !ok {
		return nil, opErr("services", "", fmt.Errorf("this backend cannot list services: %w", errors.ErrUnsupported))
	}
	c := r.begin(ctx, "services")
	names, err := sl.Services(c.ctx)
	err = c.end(err)
	if err != nil {
		return nil, opErr("services", "", err)
	}
	out := make([]string, 0, len(names))
	for _, n := range names {
		if ValidateServiceName(n) != nil {
			r.log.Warn("registry: skipping invalid service name read from the registry", "service", n)
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func (r *registry) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// membersLocked returns the registry's registrations and watchers. Called
// under mu.
func (r *registry) membersLocked() ([]*Registration, []*Watcher) {
	regs := make([]*Registration, 0, len(r.regs))
	for reg := range r.regs {
		regs = append(regs, reg)
	}
	ws := make([]*Watcher, 0, len(r.watchers))
	for w := range r.watchers {
		ws = append(ws, w)
	}
	return regs, ws
}

func (r *registry) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	regs, ws := r.membersLocked()
	r.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), r.opts.CloseTimeout)
	defer cancel()
	var errs []error
	var wg sync.WaitGroup
	var emu sync.Mutex
	sem := make(chan struct{}, 32) // bounded: a process may hold thousands
	for _, reg := range regs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := reg.Deregister(ctx); err != nil && !errors.Is(err, ErrClosed) {
				emu.Lock()
				errs = append(errs, err)
				emu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, w := range ws {
		w.Close()
	}
	r.cancel()
	r.wg.Wait()
	errs = append(errs, r.b.Close())
	if r.met != nil {
		_ = r.met.reg.Unregister()
	}
	return errors.Join(errs...)
}
