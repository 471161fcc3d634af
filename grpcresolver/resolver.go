package grpcresolver

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/attributes"
	"google.golang.org/grpc/experimental/balancer/weight"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/rollcall-go/rollcall/registry"
)

type serviceConfig = serviceconfig.ParseResult

// instanceKey is the attribute key under which an Endpoint carries its
// instance.
type instanceKey struct{}

// instanceAttr is the attribute value: comparable by content, so that the
// endpoint of an unchanged instance compares equal.
type instanceAttr struct{ in registry.Instance }

// Equal is used by attributes.Attributes.Equal.
func (a instanceAttr) Equal(o any) bool {
	b, ok := o.(instanceAttr)
	return ok && a.in.Equal(b.in)
}

func (a instanceAttr) String() string { return a.in.String() }

// InstanceFromEndpoint returns the registry instance an Endpoint pushed by
// this package's resolver stands for, for balancers and interceptors that
// use metadata (weight, zone, version). The instance is a copy.
func InstanceFromEndpoint(ep resolver.Endpoint) (registry.Instance, bool) {
	a, ok := ep.Attributes.Value(instanceKey{}).(instanceAttr)
	if !ok {
		return registry.Instance{}, false
	}
	return a.in.Clone(), true
}

// instanceOf is InstanceFromEndpoint without the copy, for readers that
// only read.
func instanceOf(ep resolver.Endpoint) (registry.Instance, bool) {
	a, ok := ep.Attributes.Value(instanceKey{}).(instanceAttr)
	return a.in, ok
}

// entry is one instance and the Endpoint made for it, kept so that an
// unchanged instance reuses the same Endpoint (and attributes pointer).
type entry struct {
	in   registry.Instance
	ep   resolver.Endpoint
	keep bool // the filter keeps it
}

// newEntry makes the endpoint of in. It carries the instance and, for
// gRPC's own weighted policies (ring_hash, this package's
// WeightedRoundRobin), the instance's weight in gRPC's endpoint weight
// attribute.
func newEntry(in registry.Instance, keep bool) entry {
	ep := resolver.Endpoint{
		Addresses:  []resolver.Address{{Addr: in.Addr}},
		Attributes: attributes.New(instanceKey{}, instanceAttr{in}),
	}
	return entry{in: in, ep: weight.Set(ep, weight.EndpointInfo{Weight: uint32(in.Weight())}), keep: keep}
}

// keep reports whether the resolver's filter keeps in. It is user code:
// never called under mu.
func (r *grpcResolver) keep(in registry.Instance) bool { return r.filter == nil || r.filter(in) }

// newEntries makes the entries of ins, outside mu.
func (r *grpcResolver) newEntries(ins []registry.Instance) []entry {
	es := make([]entry, len(ins))
	for i, in := range ins {
		es[i] = newEntry(in, r.keep(in))
	}
	return es
}

// grpcResolver follows one service for one gRPC channel. Two goroutines:
// watchLoop applies the registry Watcher's updates; relistLoop serves
// ResolveNow hints. Both push to the ClientConn under mu, so pushes are
// ordered.
type grpcResolver struct {
	reg      registry.Registry
	service  string
	filter   func(registry.Instance) bool // nil keeps every instance
	cc       resolver.ClientConn
	sc       *serviceConfig
	log      *slog.Logger
	interval time.Duration
	release  func()
	w        *registry.Watcher

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	hint    chan struct{} // ResolveNow hints, capacity 1
	once    sync.Once
	relists atomic.Int64 // relists begun, for tests
	hints   atomic.Int64 // ResolveNow hints served (a relist, or none for a live watch)

	mu       sync.Mutex
	view     []entry        // the watcher's delivered list, sorted by ID
	addrs    map[string]int // instances per address in view
	dups     int            // addresses in view shared by more than one instance
	override []entry        // a relist's result (sorted by ID), used while the watch is stale
	watchOK  bool           // the watcher's last update was synced and not stale
	stale    bool           // the watcher said stale (for log transitions)
	known    bool           // a state has been pushed
	last     []resolver.Endpoint
	seen     map[string]struct{} // scratch for de-duplicating addresses
}

var _ resolver.Resolver = (*grpcResolver)(nil)

func newResolver(reg registry.Registry, service string, filter func(registry.Instance) bool, cc resolver.ClientConn, sc *serviceConfig, o options, target string, release func()) (*grpcResolver, error) {
	ctx, cancel := context.WithCancel(context.Background())
	w, err := reg.Watch(ctx, service)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("grpcresolver: target %q: %w", target, err)
	}
	r := &grpcResolver{
		reg: reg, service: service, filter: filter, cc: cc, sc: sc, interval: o.resolveNowInterval, release: release, w: w,
		log: o.logger.With("target", target),
		ctx: ctx, cancel: cancel, hint: make(chan struct{}, 1),
		addrs: map[string]int{}, seen: map[string]struct{}{},
	}
	r.wg.Add(2)
	go r.watchLoop()
	go r.relistLoop()
	return r, nil
}

// ResolveNow asks for a relist; it never blocks.
func (r *grpcResolver) ResolveNow(resolver.ResolveNowOptions) {
	select {
	case r.hint <- struct{}{}:
	default:
	}
}

// Close stops both goroutines and the watch, waits for them, and releases
// the registry. It is idempotent.
func (r *grpcResolver) Close() {
	r.once.Do(func() {
		r.cancel()
		r.wg.Wait()
		_ = r.w.Close()
		r.release()
	})
}

func (r *grpcResolver) watchLoop() {
	defer r.wg.Done()
	for {
		u, err := r.w.Next(r.ctx)
		if err != nil {
			if r.ctx.Err() == nil {
				// The registry was closed under us: keep what was pushed.
				r.log.Error("grpcresolver: watch ended; keeping the last list", "service", r.service, "err", err)
			}
			return
		}
		r.onUpdate(u)
	}
}

func (r *grpcResolver) onUpdate(u registry.Update) {
	changed, added := r.newEntries(u.Changed), r.newEntries(u.Added)
	r.mu.Lock()
	defer r.mu.Unlock()
	if !u.Synced {
		// Stale before any list was known.
		r.watchOK = false
		r.stale = true
		if !r.known {
			r.log.Warn("grpcresolver: registry unreachable and no instances known yet", "service", r.service, "err", u.Err)
			r.cc.ReportError(fmt.Errorf("grpcresolver: service %s: registry unreachable, no instances known yet: %w", r.service, u.Err))
		}
		return
	}
	r.applyLocked(u.Removed, changed, added)
	if u.Stale {
		r.watchOK = false
		if !r.stale {
			r.stale = true
			r.log.Warn("grpcresolver: registry unreachable; keeping the last list", "service", r.service, "endpoints", len(r.last), "err", u.Err)
		}
		if r.override != nil {
			return // a relist done while stale is fresher than the frozen list
		}
	} else {
		if r.stale && r.known {
			r.log.Info("grpcresolver: registry reachable again", "service", r.service, "instances", len(r.view))
		}
		r.watchOK, r.stale, r.override = true, false, nil
	}
	r.pushLocked()
}

// applyLocked applies an update's changes to view.
func (r *grpcResolver) applyLocked(removed []registry.Instance, changed, added []entry) {
	for _, in := range removed {
		if i, ok := find(r.view, in.ID); ok {
			r.countAddr(r.view[i].in.Addr, -1)
			r.view = slices.Delete(r.view, i, i+1)
		}
	}
	// Many additions (the first list, a resync) are appended and sorted
	// once; a few are inserted in place.
	bulk := len(added)+len(changed) > 16
	sorted := len(r.view) // view[:sorted] is sorted
	for _, es := range [2][]entry{changed, added} {
		for _, e := range es {
			in := e.in
			r.countAddr(in.Addr, +1)
			i, ok := find(r.view[:sorted], in.ID)
			switch {
			case ok:
				r.countAddr(r.view[i].in.Addr, -1)
				r.view[i] = e
			case bulk:
				r.view = append(r.view, e)
			default:
				r.view = slices.Insert(r.view, i, e)
				sorted++
			}
		}
	}
	if sorted < len(r.view) {
		slices.SortFunc(r.view, compareEntries)
	}
}

func compareEntries(a, b entry) int { return strings.Compare(a.in.ID, b.in.ID) }

// find returns the index of id in es, sorted by ID, or where it would be
// inserted.
func find(es []entry, id string) (int, bool) {
	return slices.BinarySearchFunc(es, id, func(e entry, id string) int { return strings.Compare(e.in.ID, id) })
}

func (r *grpcResolver) countAddr(addr string, d int) {
	n := r.addrs[addr]
	switch {
	case d > 0 && n == 1:
		r.dups++
	case d < 0 && n == 2:
		r.dups--
	}
	if n+d == 0 {
		delete(r.addrs, addr)
	} else {
		r.addrs[addr] = n + d
	}
}

// pushLocked sends the current list to gRPC unless it equals the last one.
func (r *grpcResolver) pushLocked() {
	src, dedup := r.view, r.dups > 0
	if r.override != nil {
		src, dedup = r.override, true
	}
	eps := make([]resolver.Endpoint, 0, len(src))
	if dedup {
		// Instances sharing an address: one endpoint, the smallest ID.
		clear(r.seen)
		for i := range src {
			if !src[i].keep {
				continue
			}
			if _, dup := r.seen[src[i].in.Addr]; !dup {
				r.seen[src[i].in.Addr] = struct{}{}
				eps = append(eps, src[i].ep)
			}
		}
	} else {
		for i := range src {
			if src[i].keep {
				eps = append(eps, src[i].ep)
			}
		}
	}
	if r.known && sameEndpoints(r.last, eps) {
		return
	}
	addrs := make([]resolver.Address, len(eps))
	for i := range eps {
		addrs[i] = eps[i].Addresses[0]
	}
	r.known, r.last = true, eps
	r.log.Debug("grpcresolver: update", "service", r.service, "endpoints", len(eps))
	if err := r.cc.UpdateState(resolver.State{Endpoints: eps, Addresses: addrs, ServiceConfig: r.sc}); err != nil {
		// A watch-based resolver does not need to re-resolve: the next
		// registry change brings a new list.
		r.log.Debug("grpcresolver: gRPC rejected the update", "service", r.service, "endpoints", len(eps), "err", err)
	}
}

func sameEndpoints(a, b []resolver.Endpoint) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Addresses[0].Addr != b[i].Addresses[0].Addr || !a[i].Attributes.Equal(b[i].Attributes) {
			return false
		}
	}
	return true
}

// relistLoop serves ResolveNow hints with a Lookup, at most once per
// interval, while the watch is stale: a live watch is at least as fresh as
// a relist, whose result would be thrown away (gRPC sends a hint whenever a
// connection fails, which a server going away does to every client).
func (r *grpcResolver) relistLoop() {
	defer r.wg.Done()
	var last time.Time
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.hint:
		}
		if wait := time.Until(last.Add(r.interval)); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-r.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		select { // hints that came while waiting are served by this relist
		case <-r.hint:
		default:
		}
		r.mu.Lock()
		live := r.watchOK
		r.mu.Unlock()
		if live {
			r.hints.Add(1)
			continue
		}
		last = time.Now()
		r.relists.Add(1)
		ctx, cancel := context.WithTimeout(r.ctx, lookupTimeout)
		list, err := r.reg.Lookup(ctx, r.service)
		cancel()
		if err == nil {
			r.onRelist(list)
		} else if r.ctx.Err() == nil {
			r.log.Debug("grpcresolver: relist failed; keeping the last list", "service", r.service, "err", err)
		}
		r.hints.Add(1)
	}
}

func (r *grpcResolver) onRelist(list []registry.Instance) {
	keep := make([]bool, len(list))
	for i, in := range list {
		keep[i] = r.keep(in)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.watchOK {
		return // the watch is live and at least as fresh as the relist
	}
	es := make([]entry, len(list)) // Lookup returns them sorted by ID
	for i, in := range list {
		if j, ok := find(r.view, in.ID); ok && r.view[j].in.Equal(in) {
			es[i] = r.view[j]
		} else {
			es[i] = newEntry(in, keep[i])
		}
	}
	r.override = es
	r.log.Info("grpcresolver: watch is stale; using a fresh list from a relist", "service", r.service, "instances", len(es))
	r.pushLocked()
}
