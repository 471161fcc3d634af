// Package selector picks instances of a service for clients that do not use
// gRPC: a Picker follows a registry.Watcher and picks an instance per call,
// with the same policies as package grpcresolver's (weights, zone
// preference, metadata filters), and Transport is an http.RoundTripper that
// sends requests for http://SERVICE/path to the instances a Picker picks.
//
//	w, err := reg.Watch(ctx, "user.rpc")
//	p := selector.NewPicker(w, &selector.Options{Zone: "eu-1a"})
//	defer p.Close()
//	client := &http.Client{Transport: selector.NewTransport(nil, p)}
//	resp, err := client.Get("http://user.rpc/users/42")
//
// # Policies
//
// Picks are weighted round robin by registry.MetaWeight (1 when unset),
// smooth: weights 1:3 give B B A B, B B A B, ... (the schedule of grpc-go's
// weighted_round_robin; Options.IgnoreWeights makes it plain round robin).
// Options.Filter keeps only some instances (registry.MatchMetadata for a
// version or a label); instances that share an address count once (the
// smallest ID), as in package grpcresolver. With Options.Zone set, picks go to the instances of
// that zone (registry.MetaZone) while at least Options.MinLocal of them are
// listed, and to every instance otherwise. A Picker knows only what the
// registry lists; it does not probe instances (Transport retries another
// instance when one cannot be reached). Options.SubsetSize limits a client
// to a deterministic subset of a large service.
//
// # Stale and empty lists
//
// The Picker's list is the Watcher's: while the registry is unreachable the
// Watcher keeps its last list (stale) and the Picker keeps picking from it.
// When the registry says the service has no instances, or none passes the
// filter, Pick fails at once with an error wrapping ErrNoInstances; while
// no list has been known yet (the registry was unreachable from the start),
// it fails with the Watcher's error, which wraps registry.ErrUnavailable.
// Until the Watcher's first update Pick waits for it, as long as its
// context allows.
//
// # Cost
//
// The Picker rebuilds an immutable snapshot of its list on each update, in
// its own goroutine, and publishes it through an atomic pointer: Pick is an
// atomic load, an atomic add and a few integer operations, with no lock and
// no allocation (see docs/BENCHMARKS.md).
package selector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/rollcall-go/rollcall/internal/subset"
	"github.com/rollcall-go/rollcall/internal/wrr"
	"github.com/rollcall-go/rollcall/registry"
)

// Errors of Pick, tested with errors.Is.
var (
	// ErrNoInstances says the registry lists no instance of the service,
	// or none that the filter keeps.
	ErrNoInstances = errors.New("selector: no instances")
	// ErrClosed is returned by Pick after Close.
	ErrClosed = errors.New("selector: closed")
)

// Options configure a Picker. The zero value picks every instance, weighted.
type Options struct {
	// Filter keeps the instances it returns true for; nil keeps all. It is
	// called from the Picker's goroutine, never under a lock, once per
	// instance and update; it must not block.
	Filter func(registry.Instance) bool
	// Zone, when not empty, is the client's zone: picks go to the
	// instances whose registry.MetaZone is Zone while at least MinLocal of
	// them (1 when MinLocal < 1) pass the filter, and to all instances
	// otherwise.
	Zone     string
	MinLocal int
	// IgnoreWeights picks in plain round robin.
	IgnoreWeights bool
	// SubsetSize, when positive, makes the Picker use only a subset of
	// that many of the instances the filter keeps: the deterministic
	// subset of the client numbered ClientIndex (0, 1, 2, ...), as
	// package grpcresolver's policies take it (see its package doc).
	SubsetSize  int
	ClientIndex int
	// Logger receives the Picker's log lines; slog.Default() when nil.
	Logger *slog.Logger
}

// Picker picks instances of one service. It is safe for concurrent use.
type Picker struct {
	w       *registry.Watcher
	o       Options
	service string
	seq     atomic.Uint64
	snap    atomic.Pointer[snapshot]
	ready   chan struct{} // closed when snap is first set
	closed  chan struct{} // closed by Close
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	once    sync.Once
}

// snapshot is what Pick reads; it is never written once published.
type snapshot struct {
	picks []registry.Instance // the instances picks go to (local ones, or all)
	all   []registry.Instance // every instance the filter keeps (for retries)
	sched *wrr.Schedule       // over picks
	err   error               // Pick fails with it when not nil
	stale bool
}

// NewPicker returns a Picker over w's updates and starts following them.
// The Picker owns w: nothing else may call w.Next, and Close closes it.
// opts may be nil.
func NewPicker(w *registry.Watcher, opts *Options) *Picker {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	o.MinLocal = max(o.MinLocal, 1)
	ctx, cancel := context.WithCancel(context.Background())
	p := &Picker{w: w, o: o, service: w.Service(), ready: make(chan struct{}), closed: make(chan struct{}), ctx: ctx, cancel: cancel}
	p.wg.Add(1)
	go p.follow()
	return p
}

// Service returns the name of the service the Picker picks from.
func (p *Picker) Service() string { return p.service }

// Close stops the Picker and closes its Watcher. It is idempotent; after
// it Pick returns ErrClosed.
func (p *Picker) Close() error {
	p.once.Do(func() {
		close(p.closed)
		p.cancel()
		p.wg.Wait()
		_ = p.w.Close()
	})
	return nil
}

// follow applies the Watcher's updates until Close. When the Watcher ends
// otherwise (its registry was closed), the last list stays.
func (p *Picker) follow() {
	defer p.wg.Done()
	for {
		u, err := p.w.Next(p.ctx)
		if err != nil {
			if p.ctx.Err() == nil {
				p.o.Logger.Error("selector: watch ended; keeping the last list", "service", p.service, "err", err)
			}
			return
		}
		s := p.build(u)
		if old := p.snap.Swap(s); old == nil {
			close(p.ready)
		} else if s.stale && !old.stale {
			p.o.Logger.Warn("selector: registry unreachable; picking from the last list", "service", p.service, "err", u.Err)
		} else if !s.stale && old.stale {
			p.o.Logger.Info("selector: registry reachable again", "service", p.service)
		}
	}
}

// build makes the snapshot of an update.
func (p *Picker) build(u registry.Update) *snapshot {
	if !u.Synced {
		return &snapshot{stale: true, err: fmt.Errorf("selector: service %s: no instances known yet: %w", p.service, u.Err)}
	}
	list := u.Instances() // sorted by ID
	n := len(list)
	seen := make(map[string]bool, len(list))
	list = slices.DeleteFunc(list, func(in registry.Instance) bool {
		// Instances that share an address are one (the smallest ID), as
		// for the gRPC resolver.
		if seen[in.Addr] || p.o.Filter != nil && !p.o.Filter(in) {
			return true
		}
		seen[in.Addr] = true
		return false
	})
	s := &snapshot{stale: u.Stale}
	switch {
	case n == 0:
		s.err = fmt.Errorf("%w: the registry lists no instance of %s", ErrNoInstances, p.service)
	case len(list) == 0:
		s.err = fmt.Errorf("%w: none of the %d instances of %s passes the filter", ErrNoInstances, n, p.service)
	}
	if s.err != nil {
		return s
	}
	if p.o.SubsetSize > 0 {
		keys := make([]string, len(list))
		for i, in := range list {
			keys[i] = in.Addr
		}
		idx := subset.Choose(keys, p.o.SubsetSize, max(p.o.ClientIndex, 0))
		sub := make([]registry.Instance, len(idx))
		for j, i := range idx {
			sub[j] = list[i]
		}
		list = sub
	}
	s.all, s.picks = list, list
	if p.o.Zone != "" {
		var local []registry.Instance
		for _, in := range list {
			if in.Zone() == p.o.Zone {
				local = append(local, in)
			}
		}
		if len(local) >= p.o.MinLocal {
			s.picks = local
		}
	}
	weights := make([]int, len(s.picks))
	for i, in := range s.picks {
		weights[i] = 1
		if !p.o.IgnoreWeights {
			weights[i] = in.Weight()
		}
	}
	s.sched = wrr.New(weights)
	return s
}

// load returns the current snapshot, waiting for the first one.
func (p *Picker) load(ctx context.Context) (*snapshot, error) {
	select {
	case <-p.closed:
		return nil, ErrClosed
	default:
	}
	if s := p.snap.Load(); s != nil {
		return s, nil
	}
	select {
	case <-p.ready:
		return p.snap.Load(), nil
	case <-p.closed:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, fmt.Errorf("selector: service %s: waiting for the first list: %w", p.service, ctx.Err())
	}
}

// Pick returns the instance the next call should go to. It waits for the
// Watcher's first update as long as ctx allows, and fails with ErrClosed,
// an error wrapping ErrNoInstances, or one wrapping the registry's error
// when no list was ever known (see the package doc). The instance's
// Metadata is shared with the Picker: read it, do not change it.
func (p *Picker) Pick(ctx context.Context) (registry.Instance, error) {
	s, err := p.load(ctx)
	if err != nil {
		return registry.Instance{}, err
	}
	if s.err != nil {
		return registry.Instance{}, s.err
	}
	return s.picks[s.sched.Next(&p.seq)], nil
}

// pickExcept picks an instance whose address is not in tried: from the
// preferred ones if one is left there, then from all. ok is false when
// every instance has been tried.
func (p *Picker) pickExcept(ctx context.Context, tried []string) (in registry.Instance, ok bool, err error) {
	s, err := p.load(ctx)
	if err != nil {
		return registry.Instance{}, false, err
	}
	if s.err != nil {
		return registry.Instance{}, false, s.err
	}
	for range len(s.picks) { // a few turns of the schedule, usually one
		if in := s.picks[s.sched.Next(&p.seq)]; !slices.Contains(tried, in.Addr) {
			return in, true, nil
		}
	}
	for _, list := range [2][]registry.Instance{s.picks, s.all} {
		for _, in := range list {
			if !slices.Contains(tried, in.Addr) {
				return in, true, nil
			}
		}
	}
	return registry.Instance{}, false, nil
}
