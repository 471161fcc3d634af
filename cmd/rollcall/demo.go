package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/grpcresolver" // etcd:// targets for grpc.NewClient, weighted policy
	"github.com/rollcall-go/rollcall/registry"
)

// demoSchedule sets the pace of the demo.
type demoSchedule struct {
	TTL    time.Duration // lease TTL of the servers' registrations
	Call   time.Duration // time between two calls of the client
	Report time.Duration // time between two lines of call counts
	Warmup time.Duration // calls before the crash
	Outage time.Duration // how long etcd stays stopped
	After  time.Duration // calls after the new server got its first call
	Wait   time.Duration // longest wait for something expected (beyond the TTL)
}

// The default schedule ends in about 40 seconds. The outage is well within
// the TTL, so that the servers' leases survive it as they survive a short
// etcd restart in production: a client renews every TTL/3 and gives a lease
// up TTL after its last renewal.
var defaultDemo = demoSchedule{
	TTL:    15 * time.Second,
	Call:   50 * time.Millisecond,
	Report: 2 * time.Second,
	Warmup: 5 * time.Second,
	Outage: 6 * time.Second,
	After:  4 * time.Second,
	Wait:   15 * time.Second,
}

const demoService = "demo.Greeter"

func (c *cli) demo(ctx context.Context, args []string) error {
	fs := c.newFlagSet("demo", "demo")
	if _, err := c.parse(fs, args); err != nil {
		return err
	}
	return runDemo(ctx, c.stdout, defaultDemo)
}

// demo is one run of the demo.
type demo struct {
	s      demoSchedule
	w      io.Writer
	start  time.Time
	quiet  *slog.Logger
	outMu  sync.Mutex
	etcd   *embed.Etcd
	cfg    *embed.Config
	dir    string
	client string // etcd's address for its clients (the relay's)
	relay  *relay

	mu      sync.Mutex
	calls   []callRecord
	servers map[string]*demoServer
	events  []regEvent // what the registry watcher saw
}

type callRecord struct {
	at     time.Time
	server string // empty when the call failed
	err    error
}

type regEvent struct {
	at    time.Time
	kind  string // "+", "-", "stale", "fresh"
	id    string
	count int
}

func (d *demo) say(format string, args ...any) {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.w, "[%5.1fs] %s\n", time.Since(d.start).Seconds(), fmt.Sprintf(format, args...))
}

func (d *demo) section(format string, args ...any) {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.w, "\n== %s ==\n", fmt.Sprintf(format, args...))
}

// runDemo runs the demo and writes its account to w. It returns an error
// only if the demo could not be set up; what happens during it is told, not
// returned.
func runDemo(ctx context.Context, w io.Writer, s demoSchedule) (err error) {
	d := &demo{s: s, w: w, start: time.Now(), servers: map[string]*demoServer{},
		quiet: slog.New(slog.NewTextHandler(io.Discard, nil))}
	fmt.Fprintf(w, "rollcall demo: gRPC servers register in etcd; a gRPC client finds them through etcd:// and\n"+
		"balances its calls across them, through a crash and a registry outage; then a second\n"+
		"client balances by the servers' weights. About %v.\n"+
		"Lines starting with \"etcd:\" are what a watcher of the registry sees; \"calls:\" lines count\n"+
		"the client's calls since the previous one, by the server that answered.\n\n", s.total().Round(time.Second))

	d.dir, err = os.MkdirTemp("", "rollcall-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(d.dir)
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	d.client = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
	d.cfg = etcdConfig(d.dir, ports[1], ports[2])
	d.relay = newRelay(d.client, d.cfg.ListenClientUrls[0].Host)
	if err := d.startEtcd(); err != nil {
		return err
	}
	defer func() { d.stopEtcd() }()
	d.say("etcd is running inside this process; its clients reach it at %s (data in %s)", d.client, d.dir)

	// A watcher on the registry, to tell what etcd holds as it changes.
	watchCtx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopWatch(); wg.Wait() }()
	wreg, wcli, err := d.newRegistry(&severable{})
	if err != nil {
		return err
	}
	defer wcli.Close()
	defer wreg.Close()
	watcher, err := wreg.Watch(watchCtx, demoService)
	if err != nil {
		return err
	}
	wg.Add(1)
	go func() { defer wg.Done(); d.narrate(watchCtx, watcher) }()

	for i := 1; i <= 3; i++ {
		if _, err := d.startServer(ctx, fmt.Sprintf("server-%d", i)); err != nil {
			return err
		}
	}
	defer d.stopServers()

	target := "etcd://" + d.client + "/" + demoService
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	d.say("client: grpc.NewClient(%q): round robin over whatever etcd lists; one call every %v", target, s.Call)
	callCtx, stopCalls := context.WithCancel(ctx)
	defer stopCalls()
	wg.Add(2)
	go func() { defer wg.Done(); d.callLoop(callCtx, conn) }()
	go func() { defer wg.Done(); d.reportLoop(callCtx) }()

	phases := &demoPhases{}
	phases.warmup = time.Now()
	if !d.sleep(ctx, s.Warmup) {
		return ctx.Err()
	}

	d.section("server-2 crashes: its process dies without deregistering")
	phases.crash = time.Now()
	d.crashServer("server-2")
	d.say("server-2 crashed")
	phases.crashGone = d.waitEvent(ctx, "-", "server-2", s.TTL+s.Wait)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !d.sleep(ctx, s.Report) {
		return ctx.Err()
	}

	d.section("the registry goes away: etcd is stopped")
	phases.outage = time.Now()
	d.stopEtcd()
	d.say("etcd stopped")
	if !d.sleep(ctx, s.Outage) {
		return ctx.Err()
	}

	d.section("etcd starts again, on the same ports and data directory")
	if err := d.startEtcd(); err != nil {
		return err
	}
	phases.back = time.Now()
	d.say("etcd is running again")
	if d.sawEvent("stale", phases.outage) {
		phases.fresh = d.waitEvent(ctx, "fresh", "", s.Wait)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}

	d.section("server-4 starts and registers")
	srv4, err := d.startServer(ctx, "server-4")
	if err != nil {
		return err
	}
	phases.newServer = srv4.registered
	phases.firstCall = d.waitCall(ctx, "server-4", srv4.registered, s.Wait)
	if !phases.firstCall.IsZero() {
		d.say("server-4 got its first call %v after its registration", phases.firstCall.Sub(srv4.registered).Round(time.Millisecond))
	}
	if !d.sleep(ctx, s.After) {
		return ctx.Err()
	}

	d.section("server-4's weight becomes 3; a second client balances by weight")
	phases.weighted = d.weights(ctx, target, srv4)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	stopCalls()
	stopWatch()
	wg.Wait()
	phases.end = time.Now()
	d.section("done")
	d.summary(phases)
	return nil
}

// weightedCalls is how many calls the weighted client makes.
const weightedCalls = 500

// weights sets srv4's weight to 3 in etcd and makes weightedCalls calls
// through a second client with the rollcall_weighted_round_robin policy,
// while the first client goes on with round_robin. It returns the second
// client's calls per server, or "" if it could not make them.
func (d *demo) weights(ctx context.Context, target string, srv4 *demoServer) string {
	uctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := srv4.rr.Update(uctx, registry.Instance{Service: demoService, ID: srv4.name, Addr: srv4.addr,
		Metadata: map[string]string{registry.MetaVersion: "1.0", registry.MetaWeight: "3"}}); err != nil {
		d.say("updating server-4's weight: %v", err)
		return ""
	}
	d.say("server-4: Registration.Update with weight=3 (server-1 and server-3 have the default, 1)")
	b := grpcresolver.NewBuilder("etcd", grpcresolver.WithServiceConfig(grpcresolver.WeightedServiceConfig))
	conn, err := grpc.NewClient(target, grpc.WithResolvers(b), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		d.say("second client: %v", err)
		return ""
	}
	defer conn.Close()
	d.say("second client: grpc.NewClient(%q) with the service config %s", target, grpcresolver.WeightedServiceConfig)
	call := func() string {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		in, out := []byte("rollcall"), []byte(nil)
		if err := conn.Invoke(cctx, "/demo.Greeter/Hello", &in, &out, grpc.ForceCodec(rawCodec{})); err != nil {
			return ""
		}
		return strings.TrimPrefix(string(out), "hello from ")
	}
	// Until each server has answered once, its connection may still be
	// coming up (and its share go to the others).
	seen := map[string]bool{}
	for deadline := time.Now().Add(d.s.Wait); len(seen) < 3 && time.Now().Before(deadline) && ctx.Err() == nil; {
		if srv := call(); srv != "" {
			seen[srv] = true
		}
	}
	st := callStats{by: map[string]int{}}
	from := time.Now()
	for range weightedCalls {
		if srv := call(); srv != "" {
			st.ok++
			st.by[srv]++
		} else {
			st.failed++
		}
	}
	rr := d.stats(from, time.Now())
	d.say("second client, %d calls in a row: %s (%d failed)", weightedCalls, st.perServer(), st.failed)
	d.say("first client, round robin, meanwhile: %s", rr.perServer())
	return st.perServer()
}

// sawEvent reports whether the narrator saw an event of kind since t.
func (d *demo) sawEvent(kind string, t time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range d.events {
		if e.kind == kind && !e.at.Before(t) {
			return true
		}
	}
	return false
}

func (s demoSchedule) total() time.Duration {
	return s.Warmup + s.TTL + 2*s.Report + s.Outage + s.After + 2*time.Second
}

func (d *demo) sleep(ctx context.Context, dt time.Duration) bool {
	t := time.NewTimer(dt)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// etcdConfig is a single-member etcd on 127.0.0.1 that logs nothing.
func etcdConfig(dir string, clientPort, peerPort int) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Name = "demo"
	cfg.Dir = dir
	cu := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(clientPort))}
	pu := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(peerPort))}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true // a demo needs no durability beyond the page cache
	return cfg
}

func (d *demo) startEtcd() error {
	e, err := embed.StartEtcd(d.cfg)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return errors.New("etcd did not become ready within 30s")
	}
	d.etcd = e
	if err := d.relay.start(); err != nil {
		d.stopEtcd()
		return fmt.Errorf("listening on %s: %w", d.client, err)
	}
	return nil
}

// stopEtcd drops every client connection at once, as a dying process does,
// and closes etcd.
func (d *demo) stopEtcd() {
	d.relay.cut()
	if d.etcd != nil {
		d.etcd.Close()
		d.etcd = nil
	}
}

// newRegistry returns an etcd registry over a client of its own, whose
// connections sev can sever to simulate a crash. The client reconnects
// within a second of etcd coming back.
func (d *demo) newRegistry(sev *severable) (registry.Registry, *clientv3.Client, error) {
	cfg := clientv3.Config{Endpoints: []string{d.client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	etcd.Configure(&cfg) // fail fast with the cause while etcd is down, as etcd:// URLs do
	cfg.DialOptions = append(cfg.DialOptions,
		grpc.WithContextDialer(sev.dial),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	r, err := etcd.New(cli, &etcd.Options{TTL: d.s.TTL, Logger: d.quiet,
		Registry: registry.Options{Logger: d.quiet, CloseTimeout: 2 * time.Second},
		// Notice an unreachable etcd within a second or two (the default
		// is up to 5s), so that the narrator tells it as it happens.
		ProgressInterval: 500 * time.Millisecond, ProgressTimeout: time.Second})
	if err != nil {
		cli.Close()
		return nil, nil, err
	}
	return r, cli, nil
}

// demoServer is a gRPC server of the demo.Greeter service, registered in etcd.
type demoServer struct {
	name       string
	addr       string
	srv        *grpc.Server
	reg        registry.Registry
	cli        *clientv3.Client
	sev        *severable
	rr         *registry.Registration
	registered time.Time
	crashed    bool
}

func (d *demo) startServer(ctx context.Context, name string) (*demoServer, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &demoServer{name: name, addr: lis.Addr().String(), srv: grpc.NewServer(grpc.ForceServerCodec(rawCodec{})), sev: &severable{}}
	s.srv.RegisterService(greeterDesc(name), nil)
	go func() { _ = s.srv.Serve(lis) }() // returns when the server stops
	s.reg, s.cli, err = d.newRegistry(s.sev)
	if err != nil {
		s.srv.Stop()
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s.rr, err = s.reg.Register(rctx, registry.Instance{Service: demoService, ID: name, Addr: s.addr,
		Metadata: map[string]string{registry.MetaVersion: "1.0"}})
	if err != nil {
		s.srv.Stop()
		s.reg.Close()
		s.cli.Close()
		return nil, fmt.Errorf("registering %s: %w", name, err)
	}
	s.registered = time.Now()
	d.mu.Lock()
	d.servers[name] = s
	d.mu.Unlock()
	d.say("%s serving on %s, registered in etcd as %s/%s (lease TTL %v)", name, s.addr, demoService, name, d.s.TTL)
	return s, nil
}

// crashServer stops a server as a crash does: the gRPC server dies with
// its connections, and so do its etcd client's, so that neither its lease
// is revoked nor its key deleted: etcd drops it when the lease expires.
func (d *demo) crashServer(name string) {
	d.mu.Lock()
	s := d.servers[name]
	d.mu.Unlock()
	s.crashed = true
	s.srv.Stop()
	s.sev.sever()
	// Release what the process held; nothing reaches etcd any more.
	s.cli.Close()
	s.reg.Close()
}

func (d *demo) stopServers() {
	d.mu.Lock()
	servers := make([]*demoServer, 0, len(d.servers))
	for _, s := range d.servers {
		servers = append(servers, s)
	}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range servers {
		if s.crashed {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			_ = s.rr.Deregister(ctx)
			s.reg.Close()
			s.cli.Close()
			s.srv.Stop()
		}()
	}
	wg.Wait()
}

// narrate tells what the registry holds as it changes.
func (d *demo) narrate(ctx context.Context, w *registry.Watcher) {
	defer w.Close()
	stale := false
	for {
		u, err := w.Next(ctx)
		if err != nil {
			return
		}
		now := time.Now()
		var evs []regEvent
		for _, in := range u.Added {
			d.say("etcd: + %s (%s)", in.ID, in.Addr)
			evs = append(evs, regEvent{at: now, kind: "+", id: in.ID})
		}
		for _, in := range u.Removed {
			d.say("etcd: - %s: its registration is gone", in.ID)
			evs = append(evs, regEvent{at: now, kind: "-", id: in.ID})
		}
		n := len(u.Instances())
		switch {
		case u.Stale && !stale:
			d.say("etcd unreachable: watchers and the gRPC client keep their last list (%d servers)", n)
			evs = append(evs, regEvent{at: now, kind: "stale", count: n})
		case !u.Stale && stale:
			d.say("etcd reachable again: the watch resynced, %d servers listed", n)
			evs = append(evs, regEvent{at: now, kind: "fresh", count: n})
		}
		stale = u.Stale
		d.mu.Lock()
		d.events = append(d.events, evs...)
		d.mu.Unlock()
	}
}

// waitEvent waits for a registry event; zero time if it did not come.
func (d *demo) waitEvent(ctx context.Context, kind, id string, max time.Duration) time.Time {
	deadline := time.Now().Add(max)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		d.mu.Lock()
		for _, e := range d.events {
			if e.kind == kind && e.id == id {
				d.mu.Unlock()
				return e.at
			}
		}
		d.mu.Unlock()
		d.sleep(ctx, 20*time.Millisecond) // polling the narrator's record
	}
	if ctx.Err() == nil {
		d.say("(no %q %s event within %v)", kind, id, max)
	}
	return time.Time{}
}

// waitCall waits for the first call answered by server after since.
func (d *demo) waitCall(ctx context.Context, server string, since time.Time, max time.Duration) time.Time {
	deadline := time.Now().Add(max)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		d.mu.Lock()
		for _, c := range d.calls {
			if c.server == server && c.at.After(since) {
				d.mu.Unlock()
				return c.at
			}
		}
		d.mu.Unlock()
		d.sleep(ctx, 20*time.Millisecond) // polling the call record
	}
	if ctx.Err() == nil {
		d.say("(%s got no call within %v)", server, max)
	}
	return time.Time{}
}

// callLoop calls demo.Greeter/Hello every s.Call and records who answered.
func (d *demo) callLoop(ctx context.Context, conn *grpc.ClientConn) {
	t := time.NewTicker(d.s.Call)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		in, out := []byte("rollcall"), []byte(nil)
		err := conn.Invoke(cctx, "/demo.Greeter/Hello", &in, &out, grpc.ForceCodec(rawCodec{}))
		cancel()
		if ctx.Err() != nil {
			return
		}
		rec := callRecord{at: time.Now(), err: err}
		if err == nil {
			rec.server = strings.TrimPrefix(string(out), "hello from ")
		}
		d.mu.Lock()
		d.calls = append(d.calls, rec)
		d.mu.Unlock()
	}
}

// reportLoop prints the calls of each interval.
func (d *demo) reportLoop(ctx context.Context) {
	t := time.NewTicker(d.s.Report)
	defer t.Stop()
	from := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		to := time.Now()
		st := d.stats(from, to)
		from = to
		line := fmt.Sprintf("calls: %3d ok, %d failed   %s", st.ok, st.failed, st.perServer())
		if st.lastErr != nil {
			line += fmt.Sprintf("   (last error: %v)", st.lastErr)
		}
		d.say("%s", line)
	}
}

type callStats struct {
	ok, failed int
	by         map[string]int
	lastErr    error
}

func (d *demo) stats(from, to time.Time) callStats {
	st := callStats{by: map[string]int{}}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.calls {
		if c.at.Before(from) || !c.at.Before(to) {
			continue
		}
		if c.err != nil {
			st.failed++
			st.lastErr = c.err
			continue
		}
		st.ok++
		st.by[c.server]++
	}
	return st
}

func (st callStats) perServer() string {
	var parts []string
	for i := 1; i <= 4; i++ {
		name := fmt.Sprintf("server-%d", i)
		if n := st.by[name]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s:%d", name, n))
		}
	}
	return strings.Join(parts, "  ")
}

// demoPhases are the moments of the demo.
type demoPhases struct {
	warmup, crash, crashGone, outage, back, fresh, newServer, firstCall, end time.Time
	weighted                                                                 string // the weighted client's calls per server
}

func (d *demo) summary(p *demoPhases) {
	all := d.stats(d.start, p.end)
	before := d.stats(p.warmup, p.crash)
	afterCrash := d.stats(p.crash, p.outage)
	outage := d.stats(p.outage, p.back)
	d.mu.Lock()
	var lastToCrashed time.Time
	for _, c := range d.calls {
		if c.server == "server-2" && c.at.After(p.crash) {
			lastToCrashed = c.at
		}
	}
	d.mu.Unlock()

	var b strings.Builder
	fmt.Fprintf(&b, "What happened:\n")
	fmt.Fprintf(&b, "  Calls: %d made, %d succeeded, %d failed.\n", all.ok+all.failed, all.ok, all.failed)
	fmt.Fprintf(&b, "  1. Three servers registered themselves in etcd, each under a lease that its client\n"+
		"     keeps alive. The client found them through etcd:// and spread its calls across\n"+
		"     them: %s.\n", before.perServer())
	moved := "at once"
	if !lastToCrashed.IsZero() {
		moved = fmt.Sprintf("after %v", lastToCrashed.Sub(p.crash).Round(time.Millisecond))
	}
	fmt.Fprintf(&b, "  2. server-2 crashed without deregistering. gRPC saw its connection break and stopped\n"+
		"     sending it calls %s (%d calls failed meanwhile); the others took over: %s.\n", moved, afterCrash.failed, afterCrash.perServer())
	if !p.crashGone.IsZero() {
		fmt.Fprintf(&b, "     etcd dropped server-2 %v after the crash, when its lease ran out (TTL %v from its\n"+
			"     last renewal): that is how a registry learns of a crash.\n", p.crashGone.Sub(p.crash).Round(100*time.Millisecond), d.s.TTL)
	} else {
		fmt.Fprintf(&b, "     etcd had not dropped server-2 when the demo moved on.\n")
	}
	fmt.Fprintf(&b, "  3. etcd was down for %v. The client kept the last list it had (it never empties\n"+
		"     it because the registry is unreachable): %d calls made meanwhile, %d succeeded, %d failed.\n",
		p.back.Sub(p.outage).Round(100*time.Millisecond), outage.ok+outage.failed, outage.ok, outage.failed)
	switch {
	case !p.fresh.IsZero():
		fmt.Fprintf(&b, "  4. etcd came back with its data; the watches resynced %v after it was up, and the\n"+
			"     servers' leases, renewed again as soon as their clients reconnected, were still there.\n", p.fresh.Sub(p.back).Round(100*time.Millisecond))
	case !d.sawEvent("stale", p.outage):
		fmt.Fprintf(&b, "  4. etcd came back with its data before the watches noticed it was gone.\n")
	default:
		fmt.Fprintf(&b, "  4. etcd came back, but no watch had resynced when the demo moved on.\n")
	}
	if !p.firstCall.IsZero() {
		took := p.firstCall.Sub(p.newServer)
		fmt.Fprintf(&b, "  5. server-4 registered and got its first call %v later: the client follows the\n"+
			"     registry's changes as they happen.\n", took.Round(time.Millisecond))
		if took > time.Second {
			fmt.Fprintf(&b, "     Right after an outage that takes longer than usual (tens of milliseconds):\n"+
				"     the client's own connection to etcd is still coming back, as gRPC waits longer\n"+
				"     and longer between reconnection attempts while etcd is down.\n")
		}
	} else {
		fmt.Fprintf(&b, "  5. server-4 registered but got no call before the end.\n")
	}
	if p.weighted != "" {
		fmt.Fprintf(&b, "  6. server-4's weight became 3 in etcd. A client with rollcall_weighted_round_robin\n"+
			"     sent it 3 of every 5 calls (%s); the round-robin client went\n"+
			"     on spreading evenly.\n", p.weighted)
	}
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprint(d.w, b.String())
}

// freePorts returns n distinct TCP ports that were free on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close() // held until all are chosen, so that they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// rawCodec carries []byte as the message, so that the demo's greeter needs
// no generated code.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "rollcall-demo-raw" }

// greeterDesc is demo.Greeter with one method, Hello, which answers
// "hello from NAME".
func greeterDesc(name string) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: "demo.Greeter",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Hello",
			Handler: func(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				var in []byte
				if err := dec(&in); err != nil {
					return nil, err
				}
				out := []byte("hello from " + name)
				return &out, nil
			},
		}},
	}
}
