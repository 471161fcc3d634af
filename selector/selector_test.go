package selector_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/selector"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	waitFor = testutil.WaitFor
	memSeq  atomic.Int64
)

// env is a registry server and a client of it: the in-process memory
// server (srv, with fault controls) or a real etcd (srv nil).
type env struct {
	srv *memory.Server
	reg registry.Registry
}

func newEnv(t testing.TB) *env {
	srv := memory.NamedServer(fmt.Sprintf("selector-%d", memSeq.Add(1)))
	e := &env{srv: srv, reg: memory.New(srv, &memory.Options{TTL: time.Second, Registry: registry.Options{CallTimeout: time.Second}})}
	t.Cleanup(func() { _ = e.reg.Close() })
	return e
}

// picker returns a Picker for service, closed at the end of the test.
func (e *env) picker(t testing.TB, service string, o *selector.Options) *selector.Picker {
	t.Helper()
	w, err := e.reg.Watch(context.Background(), service)
	if err != nil {
		t.Fatal(err)
	}
	p := selector.NewPicker(w, o)
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// backend is a real HTTP server on loopback, registered in the registry;
// it answers with its ID.
type backend struct {
	id, addr string
	srv      *httptest.Server
	rr       *registry.Registration
	hosts    atomic.Value // the Host header of the last request
}

func (e *env) start(t testing.TB, service, id string, md map[string]string) *backend {
	t.Helper()
	b := &backend{id: id}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hosts.Store(r.Host)
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = io.WriteString(w, id)
	}))
	t.Cleanup(b.srv.Close)
	b.addr = b.srv.Listener.Addr().String()
	b.rr = e.register(t, registry.Instance{Service: service, ID: id, Addr: b.addr, Metadata: md})
	return b
}

func (e *env) register(t testing.TB, in registry.Instance) *registry.Registration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rr, err := e.reg.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	return rr
}

func update(t testing.TB, b *backend, service string, md map[string]string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.rr.Update(ctx, registry.Instance{Service: service, ID: b.id, Addr: b.addr, Metadata: md}); err != nil {
		t.Fatal(err)
	}
}

// get makes a GET through c and returns the body (the backend's ID).
func get(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	return string(body), err
}

// getN makes n GETs, all of which must succeed, and counts them by backend.
func getN(t testing.TB, c *http.Client, url string, n int) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for i := range n {
		id, err := get(c, url)
		if err != nil {
			t.Fatalf("request %d of %d: %v", i+1, n, err)
		}
		counts[id]++
	}
	return counts
}

func client(t testing.TB, ps ...*selector.Picker) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: selector.NewTransport(tr, ps...), Timeout: 5 * time.Second}
}

func checkShare(t testing.TB, counts map[string]int, id string, want int) {
	t.Helper()
	if got := counts[id]; got < want*9/10 || got > want*11/10 {
		t.Errorf("%s got %d requests, want %d ±10%%: %v", id, got, want, counts)
	}
}

func weight(w int) map[string]string { return map[string]string{registry.MetaWeight: fmt.Sprint(w)} }

func TestWeightsSplitRequestsAndFollowTheRegistry(t *testing.T) {
	e := newEnv(t)
	e.start(t, "web", "a", weight(1))
	b := e.start(t, "web", "b", weight(3))
	c := client(t, e.picker(t, "web", nil))
	counts := getN(t, c, "http://web/", 4000)
	checkShare(t, counts, "a", 1000)
	checkShare(t, counts, "b", 3000)

	update(t, b, "web", weight(1))
	waitFor(t, 5*time.Second, "an even split after b's weight change", func() bool {
		c := getN(t, c, "http://web/", 400)
		return c["a"] == 200
	})
	counts = getN(t, c, "http://web/", 4000)
	checkShare(t, counts, "a", 2000)
	checkShare(t, counts, "b", 2000)
}

func TestIgnoreWeights(t *testing.T) {
	e := newEnv(t)
	e.start(t, "web", "a", weight(1))
	e.start(t, "web", "b", weight(3))
	p := e.picker(t, "web", &selector.Options{IgnoreWeights: true})
	counts := map[string]int{}
	for range 1000 {
		in, err := p.Pick(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		counts[in.ID]++
	}
	if counts["a"] != 500 {
		t.Fatalf("round robin over 2 instances: %v", counts)
	}
}

func TestZonePreferenceKeepsRequestsLocalFailsOverAndComesBack(t *testing.T) {
	e := newEnv(t)
	zone := func(z string) map[string]string { return map[string]string{registry.MetaZone: z} }
	a1 := e.start(t, "web", "a1", zone("a"))
	a2 := e.start(t, "web", "a2", zone("a"))
	e.start(t, "web", "b1", zone("b"))
	c := client(t, e.picker(t, "web", &selector.Options{Zone: "a", MinLocal: 2}))
	counts := getN(t, c, "http://web/", 1000)
	if counts["a1"] != 500 || counts["a2"] != 500 {
		t.Fatalf("with both local instances listed: %v; want all 1000 in zone a", counts)
	}

	// One local instance leaves: fewer than MinLocal, every zone serves.
	ctx := context.Background()
	if err := a1.rr.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "requests reaching zone b", func() bool {
		return getN(t, c, "http://web/", 10)["b1"] > 0
	})
	counts = getN(t, c, "http://web/", 1000)
	if counts["a2"] != 500 || counts["b1"] != 500 {
		t.Fatalf("after the failover: %v; want a2 and b1 half each", counts)
	}
	// All local instances leave: zone b serves everything.
	if err := a2.rr.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "requests reaching zone b only", func() bool {
		return getN(t, c, "http://web/", 10)["b1"] == 10
	})
	e.register(t, registry.Instance{Service: "web", ID: "a2", Addr: a2.addr, Metadata: zone("a")})

	// It comes back: every request is local again.
	e.register(t, registry.Instance{Service: "web", ID: "a1", Addr: a1.addr, Metadata: zone("a")})
	waitFor(t, 5*time.Second, "requests in zone a only", func() bool {
		return getN(t, c, "http://web/", 10)["b1"] == 0
	})
	counts = getN(t, c, "http://web/", 1000)
	if counts["a1"] != 500 || counts["a2"] != 500 {
		t.Fatalf("with the local instances back: %v; want all 1000 in zone a", counts)
	}
}

func TestVersionFilterFollowsAMetadataChange(t *testing.T) {
	e := newEnv(t)
	version := func(v string) map[string]string { return map[string]string{registry.MetaVersion: v} }
	a := e.start(t, "web", "a", version("v1"))
	e.start(t, "web", "b", version("v2"))
	c := client(t, e.picker(t, "web", &selector.Options{Filter: registry.MatchMetadata(registry.MetaVersion, "v2")}))
	if counts := getN(t, c, "http://web/", 100); counts["b"] != 100 {
		t.Fatalf("requests for v2: %v; want all on b", counts)
	}
	update(t, a, "web", version("v2"))
	waitFor(t, 5*time.Second, "requests reaching a, upgraded to v2", func() bool {
		return getN(t, c, "http://web/", 10)["a"] > 0
	})
	if counts := getN(t, c, "http://web/", 100); counts["a"] != 50 || counts["b"] != 50 {
		t.Fatalf("requests for v2 after a's upgrade: %v; want half each", counts)
	}
}

func TestTransportRetriesAnotherInstanceWhenOneIsUnreachable(t *testing.T) {
	e := newEnv(t)
	live := e.start(t, "web", "live", nil)
	dead := e.start(t, "web", "dead", nil)
	dead.srv.Close() // still registered: connections are refused
	p := e.picker(t, "web", nil)
	c := client(t, p)
	for i := range 20 {
		if id, err := get(c, "http://web/"); err != nil || id != "live" {
			t.Fatalf("GET %d: %q, %v; want the live instance", i, id, err)
		}
		// A POST whose dial failed sent nothing: it goes to another instance too.
		resp, err := c.Post("http://web/", "text/plain", strings.NewReader("body"))
		if err != nil {
			t.Fatalf("POST %d: %v", i, err)
		}
		resp.Body.Close()
	}

	// Every instance refuses: the error is the transport's.
	live.srv.Close()
	_, err := get(c, "http://web/")
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("GET with every instance down: %v; want the dial error", err)
	}
}

func TestTransportRetriesOnlyIdempotentRequestsOnABrokenConnection(t *testing.T) {
	e := newEnv(t)
	// broken reads the request and closes the connection without an answer.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var served atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			_, _ = http.ReadRequest(bufio.NewReader(conn))
			served.Add(1)
			conn.Close()
		}
	}()
	defer func() { lis.Close(); <-done }()
	e.register(t, registry.Instance{Service: "web", ID: "broken", Addr: lis.Addr().String()})
	e.start(t, "web", "ok", nil)

	// A new Picker starts with the first instance by ID: broken. The GET
	// sent there is sent again to ok; broken gets no new request after it.
	c := client(t, e.picker(t, "web", nil))
	for i := range 10 {
		if id, err := get(c, "http://web/"); err != nil || id != "ok" {
			t.Fatalf("GET %d: %q, %v; want the working instance", i, id, err)
		}
	}
	if n := served.Load(); n != 1 {
		t.Fatalf("broken saw %d of 10 GETs; want the first only", n)
	}

	// A POST sent to broken fails and is not sent again.
	c = client(t, e.picker(t, "web", nil))
	resp, err := c.Post("http://web/", "text/plain", strings.NewReader("body"))
	if err == nil {
		resp.Body.Close()
		t.Fatal("a POST whose connection broke succeeded")
	}
	if n := served.Load(); n != 2 {
		t.Fatalf("broken saw %d requests, want 2 (the POST once)", n)
	}
	resp, err = c.Post("http://web/", "text/plain", strings.NewReader("body"))
	if err != nil {
		t.Fatalf("the next POST, to the working instance: %v", err)
	}
	resp.Body.Close()
}

func TestUnreachableInstanceGetsNoNewRequests(t *testing.T) {
	e := newEnv(t)
	e.start(t, "web", "a-live", nil)
	dead := e.start(t, "web", "b-dead", nil)
	dead.srv.Close()
	var dials sync.Map // address → *atomic.Int64
	base := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		n, _ := dials.LoadOrStore(addr, new(atomic.Int64))
		n.(*atomic.Int64).Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer base.CloseIdleConnections()
	c := &http.Client{Transport: selector.NewTransport(base, e.picker(t, "web", nil))}
	for i := range 20 {
		if id, err := get(c, "http://web/"); err != nil || id != "a-live" {
			t.Fatalf("GET %d: %q, %v", i, id, err)
		}
	}
	n, _ := dials.Load(dead.addr)
	if got := n.(*atomic.Int64).Load(); got != 1 {
		t.Fatalf("%d dials to the unreachable instance for 20 requests; want 1", got)
	}
}

func TestHostHeaderIsTheServiceAndOtherHostsPassThrough(t *testing.T) {
	e := newEnv(t)
	b := e.start(t, "web", "a", nil)
	c := client(t, e.picker(t, "web", nil))
	if _, err := get(c, "http://web/x"); err != nil {
		t.Fatal(err)
	}
	if h := b.hosts.Load(); h != "web" {
		t.Errorf("Host header %q, want the service name", h)
	}
	// Another host goes to the wrapped transport as it is.
	if id, err := get(c, "http://"+b.addr+"/"); err != nil || id != "a" {
		t.Fatalf("GET by address: %q, %v", id, err)
	}
	if h := b.hosts.Load(); h != b.addr {
		t.Errorf("Host header %q, want %q", h, b.addr)
	}
}

func TestStaleListKeepsServing(t *testing.T) {
	e := newEnv(t)
	e.start(t, "web", "a", nil)
	e.start(t, "web", "b", nil)
	p := e.picker(t, "web", nil)
	c := client(t, p)
	getN(t, c, "http://web/", 10)
	w, err := e.reg.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	e.srv.Stop()
	waitFor(t, 10*time.Second, "the watch to turn stale", func() bool { stale, _ := w.Stale(); return stale })
	counts := getN(t, c, "http://web/", 100)
	if counts["a"] != 50 || counts["b"] != 50 {
		t.Fatalf("while the registry is down: %v; want the last list, half each", counts)
	}
	e.srv.Start()
}

func TestEmptyServiceFailsFast(t *testing.T) {
	e := newEnv(t)
	c := client(t, e.picker(t, "nobody", nil))
	_, err := get(c, "http://nobody/")
	if !errors.Is(err, selector.ErrNoInstances) || !strings.Contains(err.Error(), "selector: no instances: the registry lists no instance of nobody") {
		t.Fatalf("GET of a service without instances: %v; want ErrNoInstances naming the service", err)
	}
	e.start(t, "web", "a", map[string]string{registry.MetaVersion: "v1"})
	p := e.picker(t, "web", &selector.Options{Filter: registry.MatchMetadata(registry.MetaVersion, "v2")})
	if _, err := p.Pick(context.Background()); !errors.Is(err, selector.ErrNoInstances) || !strings.Contains(err.Error(), "filter") {
		t.Fatalf("Pick with a filter that keeps none: %v; want ErrNoInstances saying so", err)
	}
}

func TestRegistryDownFromTheStartFailsWithItsError(t *testing.T) {
	e := newEnv(t)
	e.srv.Stop()
	defer e.srv.Start()
	p := e.picker(t, "web", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.Pick(ctx); !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("Pick while the registry was never reached: %v; want registry.ErrUnavailable", err)
	}
}

func TestPickWaitsForTheFirstListAndCloseEndsIt(t *testing.T) {
	e := newEnv(t)
	e.start(t, "web", "a", nil)
	p := e.picker(t, "web", nil)
	in, err := p.Pick(context.Background()) // the first list may not be there yet
	if err != nil || in.ID != "a" {
		t.Fatalf("first Pick: %v, %v", in, err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	_ = p.Close()
	if _, err := p.Pick(context.Background()); !errors.Is(err, selector.ErrClosed) {
		t.Fatalf("Pick after Close: %v", err)
	}
}

func TestPickWhileTheListChanges(t *testing.T) {
	// Picks in several goroutines while instances come, change and go: no
	// race, and every pick is an instance that was listed.
	e := newEnv(t)
	e.register(t, registry.Instance{Service: "web", ID: "base", Addr: "127.0.0.1:1000"})
	p := e.picker(t, "web", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			for ctx.Err() == nil {
				in, err := p.Pick(ctx)
				if err != nil || !strings.HasPrefix(in.Addr, "127.0.0.1:") {
					if ctx.Err() == nil {
						errs <- fmt.Errorf("pick: %v, %v", in, err)
					}
					return
				}
			}
			errs <- nil
		}()
	}
	for i := range 50 {
		rr := e.register(t, registry.Instance{Service: "web", ID: fmt.Sprint("i", i), Addr: fmt.Sprintf("127.0.0.1:%d", 2000+i), Metadata: weight(1 + i%5)})
		if i%2 == 0 {
			if err := rr.Deregister(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
	}
	cancel()
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestSubsetsOfARoundPartitionTheInstances(t *testing.T) {
	e := newEnv(t)
	for i := range 10 {
		e.register(t, registry.Instance{Service: "svc", ID: fmt.Sprint("s", i), Addr: fmt.Sprintf("127.0.0.1:%d", 1000+i)})
	}
	owner := map[string]int{}
	for client := range 4 { // ceil(10/3) clients make a round
		p := e.picker(t, "svc", &selector.Options{SubsetSize: 3, ClientIndex: client})
		seen := map[string]bool{}
		for range 100 {
			in, err := p.Pick(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			seen[in.Addr] = true
		}
		if len(seen) < 2 || len(seen) > 3 {
			t.Fatalf("client %d picked %d instances, want its subset of 2 or 3: %v", client, len(seen), seen)
		}
		for addr := range seen {
			if c, dup := owner[addr]; dup {
				t.Fatalf("%s is in the subsets of clients %d and %d of one round", addr, c, client)
			}
			owner[addr] = client
		}
	}
	if len(owner) != 10 {
		t.Fatalf("the round's subsets hold %d of the 10 instances", len(owner))
	}
}

func TestInstancesSharingAnAddressAreOne(t *testing.T) {
	e := newEnv(t)
	e.register(t, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1001"})
	e.register(t, registry.Instance{Service: "svc", ID: "b", Addr: "127.0.0.1:1001", Metadata: weight(5)})
	e.register(t, registry.Instance{Service: "svc", ID: "c", Addr: "127.0.0.1:1002"})
	p := e.picker(t, "svc", nil)
	counts := map[string]int{}
	for range 100 {
		in, err := p.Pick(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		counts[in.ID]++
	}
	if counts["a"] != 50 || counts["c"] != 50 {
		t.Fatalf("picks %v; want a and c half each (b shares a's address)", counts)
	}
}
