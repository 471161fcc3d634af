package grpcresolver_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// probeBalancer is an LB policy that only records what the resolver gave
// the channel: the end of the path registration → registry → resolver →
// gRPC channel. It makes no connections, so that dialing hundreds of
// addresses that serve nothing costs nothing.
const probeName = "rollcall_bench_probe"

func init() { balancer.Register(probeBuilder{}) }

type probeBuilder struct{}

func (probeBuilder) Name() string { return probeName }
func (probeBuilder) Build(cc balancer.ClientConn, _ balancer.BuildOptions) balancer.Balancer {
	p := &probe{}
	cc.UpdateState(balancer.State{ConnectivityState: connectivity.Ready, Picker: p})
	probesMu.Lock()
	probes = append(probes, p)
	probesMu.Unlock()
	return p
}

var (
	probesMu sync.Mutex
	probes   []*probe
)

// observer is notified of each update. It records when each address was
// first seen, and the metadata "v" of one address (meta), touching nothing
// else so that it adds no allocations of its own per endpoint.
type observer struct {
	meta string // the address whose metadata is followed
	mu   sync.Mutex
	seen map[string]time.Time // address → first seen
	v    string               // metadata "v" of meta, last seen
	n    int                  // instances in the current list
	ch   chan struct{}        // capacity 1
}

func newObserver(meta string) *observer {
	return &observer{meta: meta, seen: map[string]time.Time{}, ch: make(chan struct{}, 1)}
}

// note records an instance (watcher path).
func (o *observer) note(in registry.Instance, now time.Time) {
	if _, ok := o.seen[in.Addr]; !ok {
		o.seen[in.Addr] = now
	}
	if in.Addr == o.meta {
		o.v = in.Metadata["v"]
	}
}

// noteState records a resolver state (resolver and gRPC paths).
func (o *observer) noteState(s resolver.State, now time.Time) {
	o.mu.Lock()
	o.n = len(s.Endpoints)
	for _, ep := range s.Endpoints {
		addr := ep.Addresses[0].Addr
		if o.meta == "" { // latency benchmark: note every new address
			if _, ok := o.seen[addr]; !ok {
				o.seen[addr] = now
			}
		} else if addr == o.meta {
			in, _ := grpcresolver.InstanceFromEndpoint(ep)
			o.v = in.Metadata["v"]
		}
	}
	o.mu.Unlock()
	o.signal()
}

func (o *observer) signal() {
	select {
	case o.ch <- struct{}{}:
	default:
	}
}

// waitSeen waits until addr has been seen and returns when.
func (o *observer) waitSeen(tb testing.TB, id string) time.Time {
	deadline := time.After(10 * time.Second)
	for {
		o.mu.Lock()
		at, ok := o.seen[id]
		o.mu.Unlock()
		if ok {
			return at
		}
		select {
		case <-o.ch:
		case <-deadline:
			tb.Fatalf("%s not seen in 10s", id)
		}
	}
}

// waitCount waits until the current list has n instances.
func (o *observer) waitCount(tb testing.TB, n int) {
	deadline := time.After(10 * time.Second)
	for {
		o.mu.Lock()
		got := o.n
		o.mu.Unlock()
		if got == n {
			return
		}
		select {
		case <-o.ch:
		case <-deadline:
			tb.Fatalf("%d instances, want %d, after 10s", got, n)
		}
	}
}

// waitMeta waits until the followed address has metadata v=val.
func (o *observer) waitMeta(tb testing.TB, val string) {
	deadline := time.After(10 * time.Second)
	for {
		o.mu.Lock()
		got := o.v
		o.mu.Unlock()
		if got == val {
			return
		}
		select {
		case <-o.ch:
		case <-deadline:
			tb.Fatalf("%s v=%s not seen in 10s", o.meta, val)
		}
	}
}

type probe struct{}

func (p *probe) UpdateClientConnState(s balancer.ClientConnState) error {
	if o := currentObserver(); o != nil {
		o.noteState(s.ResolverState, time.Now())
	}
	return nil
}
func (p *probe) ResolverError(error)                                        {}
func (p *probe) UpdateSubConnState(balancer.SubConn, balancer.SubConnState) {}
func (p *probe) Close()                                                     {}
func (p *probe) ExitIdle()                                                  {}
func (p *probe) Pick(balancer.PickInfo) (balancer.PickResult, error) {
	return balancer.PickResult{}, balancer.ErrNoSubConnAvailable
}

// The probe balancer is built by gRPC; it reports to the observer of the
// running benchmark.
var (
	obsMu  sync.Mutex
	curObs *observer
)

func currentObserver() *observer {
	obsMu.Lock()
	defer obsMu.Unlock()
	return curObs
}

func setObserver(o *observer) {
	obsMu.Lock()
	curObs = o
	obsMu.Unlock()
}

// followWatcher feeds a registry Watcher's updates to o until ctx ends.
func followWatcher(ctx context.Context, tb testing.TB, r registry.Registry, service string, o *observer, wg *sync.WaitGroup) {
	w, err := r.Watch(ctx, service)
	if err != nil {
		tb.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer w.Close()
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			now := time.Now()
			o.mu.Lock()
			o.n += len(u.Added) - len(u.Removed)
			for _, in := range u.Added {
				o.note(in, now)
			}
			for _, in := range u.Changed {
				o.note(in, now)
			}
			o.mu.Unlock()
			o.signal()
		}
	}()
}

// BenchmarkRegisterToUpdate measures, in the same run, the time from the
// start of a Register call to (1) a registry Watcher's update, (2) a
// resolver's update at its resolver.ClientConn and (3) a gRPC channel's LB
// policy receiving the resolver's update, with 100 instances already
// registered. One op is one registration and its deregistration; the
// percentiles time the registration only. With grpclog=quiet, gRPC's logger
// answers V(0) false (see BenchmarkUpdateAllocs).
func BenchmarkRegisterToUpdate(b *testing.B) {
	for _, quiet := range []bool{false, true} {
		log := "default"
		if quiet {
			log = "quiet"
		}
		b.Run("backend=mem/grpclog="+log, func(b *testing.B) {
			defer quietGRPCLog(quiet)()
			benchRegisterToUpdate(b, newMemEnv(b))
		})
		b.Run("backend=etcd/grpclog="+log, func(b *testing.B) {
			defer quietGRPCLog(quiet)()
			benchRegisterToUpdate(b, newEtcdEnv(b))
		})
	}
}

// quietGRPCLog, if quiet, installs a grpclog logger whose V(0) is false,
// and returns what restores the default's behaviour (errors to stderr,
// verbosity 0).
func quietGRPCLog(quiet bool) (restore func()) {
	if !quiet {
		return func() {}
	}
	grpclog.SetLoggerV2(grpclog.NewLoggerV2WithVerbosity(io.Discard, io.Discard, io.Discard, -1))
	return func() { grpclog.SetLoggerV2(grpclog.NewLoggerV2WithVerbosity(io.Discard, io.Discard, os.Stderr, 0)) }
}

func benchRegisterToUpdate(b *testing.B, e env) {
	const service, present = "bench", 100
	reg := e.NewRegistry(b, 10*time.Second)
	for i := range present {
		register(b, reg, registry.Instance{Service: service, ID: fmt.Sprintf("present-%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 10000+i)})
	}
	watched := newObserver("")  // a registry Watcher
	resolved := newObserver("") // a resolver, at its resolver.ClientConn
	channel := newObserver("")  // a gRPC channel's LB policy
	setObserver(channel)
	defer setObserver(nil)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	followWatcher(ctx, b, e.NewRegistry(b, 10*time.Second), service, watched, &wg)
	build(b, grpcresolver.NewBuilder(schemeOf(e.URL())), e.URL()+"/"+service, &observingCC{o: resolved}, resolver.BuildOptions{})
	builder := grpcresolver.NewBuilder(schemeOf(e.URL()), grpcresolver.WithServiceConfig(`{"loadBalancingConfig":[{"`+probeName+`":{}}]}`))
	conn := dial(b, e.URL()+"/"+service, grpc.WithResolvers(builder))
	conn.Connect()
	last := fmt.Sprintf("127.0.0.1:%d", 10000+present-1)
	watched.waitSeen(b, last)
	resolved.waitSeen(b, last)
	channel.waitSeen(b, last)

	var tw, tr, tg []time.Duration
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		addr := fmt.Sprintf("127.0.0.2:%d", 10000+i)
		start := time.Now()
		rr := register(b, reg, registry.Instance{Service: service, ID: "new-" + strconv.Itoa(i), Addr: addr})
		tw = append(tw, watched.waitSeen(b, addr).Sub(start))
		tr = append(tr, resolved.waitSeen(b, addr).Sub(start))
		tg = append(tg, channel.waitSeen(b, addr).Sub(start))
		if err := rr.Deregister(context.Background()); err != nil {
			b.Fatal(err)
		}
		watched.waitCount(b, present)
		resolved.waitCount(b, present)
		channel.waitCount(b, present)
	}
	b.StopTimer()
	report(b, "1-watcher", tw)
	report(b, "2-resolver", tr)
	report(b, "3-grpc", tg)
}

func schemeOf(u string) string {
	for i := range u {
		if u[i] == ':' {
			return u[:i]
		}
	}
	return u
}

func report(b *testing.B, what string, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	pct := func(p float64) float64 {
		return float64(ds[min(len(ds)-1, int(p*float64(len(ds))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), what+"-p50-ms")
	b.ReportMetric(pct(0.99), what+"-p99-ms")
}

// BenchmarkUpdateAllocs measures the allocations of one update (the
// metadata of one instance changes) of a service with 1,000 instances,
// through a registry Watcher alone and through the resolver. Both include
// the memory backend and the registry's own work; the difference is the
// resolver's. "resolver" stops at the resolver.ClientConn; "grpc" goes
// through a real grpc.ClientConn to an LB policy; "grpc-quietlog" too, with
// a grpclog logger whose V(0) is false, which spares gRPC the JSON dump of
// every resolver state it otherwise formats for its trace log.
func BenchmarkUpdateAllocs(b *testing.B) {
	for _, n := range []int{1000, 10} {
		for _, path := range []string{"watcher", "resolver", "grpc", "grpc-quietlog"} {
			b.Run(fmt.Sprintf("instances=%d/path=%s", n, path), func(b *testing.B) {
				quiet := path == "grpc-quietlog"
				defer quietGRPCLog(quiet)()
				if quiet {
					path = "grpc"
				}
				benchUpdateAllocs(b, n, path)
			})
		}
	}
}

func benchUpdateAllocs(b *testing.B, n int, path string) {
	const service = "bench"
	e := newMemEnv(b)
	reg := e.NewRegistry(b, 10*time.Second)
	var target *registry.Registration
	for i := range n {
		target = register(b, reg, registry.Instance{Service: service, ID: fmt.Sprintf("i-%04d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 10000+i),
			Metadata: map[string]string{"v": "0", registry.MetaZone: "zone-a"}})
	}
	in := target.Instance()
	o := newObserver(in.Addr)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	switch path {
	case "watcher":
		followWatcher(ctx, b, e.NewRegistry(b, 10*time.Second), service, o, &wg)
	case "resolver":
		cc := &observingCC{o: o}
		build(b, grpcresolver.NewBuilder("mem"), e.URL()+"/"+service, cc, resolver.BuildOptions{})
	case "grpc":
		setObserver(o)
		defer setObserver(nil)
		conn := dial(b, e.URL()+"/"+service, grpc.WithResolvers(grpcresolver.NewBuilder("mem",
			grpcresolver.WithServiceConfig(`{"loadBalancingConfig":[{"`+probeName+`":{}}]}`))))
		conn.Connect()
	}
	o.waitMeta(b, "0")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 1; b.Loop(); i++ {
		in.Metadata["v"] = strconv.Itoa(i)
		if err := target.Update(ctx, in); err != nil {
			b.Fatal(err)
		}
		o.waitMeta(b, in.Metadata["v"])
	}
}

// observingCC is a resolver.ClientConn that feeds o and keeps nothing.
type observingCC struct {
	recordingCC
	o *observer
}

func (c *observingCC) UpdateState(s resolver.State) error {
	c.o.noteState(s, time.Now())
	return nil
}
