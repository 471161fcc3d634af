package registry_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// scripted is a driver.Backend whose watch streams replay scripted events:
// a test double of the SPI (not of a server), to drive the shared layer
// through exact event sequences.
type scripted struct {
	mu      sync.Mutex
	streams [][]scriptStep // one script per Watch call, in order
	opened  int
	publish func(ctx context.Context, inst driver.Instance) (driver.Publication, error)
}

type scriptStep struct {
	ev   driver.Event
	err  error         // ends the stream
	wait chan struct{} // blocks until closed
}

func (s *scripted) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	return s.publish(ctx, inst)
}
func (s *scripted) List(context.Context, string) ([]driver.Instance, error) { return nil, nil }
func (s *scripted) Close() error                                            { return nil }
func (s *scripted) Watch(ctx context.Context, service string) (driver.Stream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.opened >= len(s.streams) {
		return &scriptStream{steps: []scriptStep{{wait: make(chan struct{})}}, done: make(chan struct{})}, nil
	}
	st := &scriptStream{steps: s.streams[s.opened], done: make(chan struct{})}
	s.opened++
	return st, nil
}

type scriptStream struct {
	steps []scriptStep
	done  chan struct{}
	once  sync.Once
}

func (st *scriptStream) Next(ctx context.Context) (driver.Event, error) {
	for len(st.steps) > 0 {
		s := st.steps[0]
		st.steps = st.steps[1:]
		if s.wait != nil {
			select {
			case <-s.wait:
				continue
			case <-ctx.Done():
				return driver.Event{}, ctx.Err()
			case <-st.done:
				return driver.Event{}, errors.New("closed")
			}
		}
		if s.err != nil {
			return driver.Event{}, s.err
		}
		return s.ev, nil
	}
	select {
	case <-ctx.Done():
		return driver.Event{}, ctx.Err()
	case <-st.done:
		return driver.Event{}, errors.New("closed")
	}
}

func (st *scriptStream) Close() error { st.once.Do(func() { close(st.done) }); return nil }

func di(id, addr string) driver.Instance { return driver.Instance{Service: "s", ID: id, Addr: addr} }

func ids(l []registry.Instance) []string {
	out := []string{}
	for _, in := range l {
		out = append(out, in.ID)
	}
	return out
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A lease that expired during an outage and was registered again reaches
// etcd's watch as DELETE then PUT of one key in one response: the instance
// must stay (on the code before ordered changes, it was removed for good).
func TestDeleteThenPutInOneBatchKeepsInstance(t *testing.T) {
	ctx := testCtx(t)
	b := &scripted{streams: [][]scriptStep{{
		{ev: driver.ResetEvent([]driver.Instance{di("g1", "127.0.0.1:1"), di("g3", "127.0.0.1:3")})},
		{ev: driver.ChangeEvent(driver.Delete("g3"), driver.Put(di("g3", "127.0.0.1:3")))},
		{ev: driver.ChangeEvent(driver.Put(di("g4", "127.0.0.1:4")))},
	}}}
	r := registry.New(b, nil)
	defer r.Close()
	w, err := r.Watch(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	var last registry.Update
	for !slices.Equal(ids(last.Instances()), []string{"g1", "g3", "g4"}) {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("Next: %v (last list %v)", err, ids(last.Instances()))
		}
		if len(u.Removed) > 0 {
			t.Fatalf("update removed %v: a delete and re-create in one batch must not remove", ids(u.Removed))
		}
		last = u
	}
}

// graceBackend: the first stream lists a and b then fails (an outage); the
// second lists only a (b's lease expired meanwhile) and, when comeBack is
// closed, b is registered again.
func graceBackend(comeBack chan struct{}) *scripted {
	steps := []scriptStep{{ev: driver.ResetEvent([]driver.Instance{di("a", "127.0.0.1:1")})}}
	if comeBack != nil {
		steps = append(steps, scriptStep{wait: comeBack}, scriptStep{ev: driver.ChangeEvent(driver.Put(di("b", "127.0.0.1:2")))})
	}
	return &scripted{streams: [][]scriptStep{
		{{ev: driver.ResetEvent([]driver.Instance{di("a", "127.0.0.1:1"), di("b", "127.0.0.1:2")})}, {err: errors.New("outage")}},
		steps,
	}}
}

func fastOpts(grace time.Duration) *registry.Options {
	return &registry.Options{Backoff: registry.Backoff{Min: time.Millisecond, Max: 5 * time.Millisecond}, ResyncGrace: grace}
}

// After an outage, an instance that is missing from the first list but
// comes back within ResyncGrace is never delivered as removed.
func TestResyncGraceHoldsARemovalThatComesBack(t *testing.T) {
	ctx := testCtx(t)
	back := make(chan struct{})
	r := registry.New(graceBackend(back), fastOpts(300*time.Millisecond))
	defer r.Close()
	w, _ := r.Watch(ctx, "s")
	for {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Removed) > 0 {
			t.Fatalf("removed %v during the resync grace", ids(u.Removed))
		}
		if u.Stale && u.Synced && strings.Contains(u.Err.Error(), "resynchronising") {
			if !slices.Equal(ids(u.Instances()), []string{"a", "b"}) {
				t.Fatalf("grace update shows %v", ids(u.Instances()))
			}
			close(back)
			break
		}
	}
	for {
		u, err := w.Next(ctx)
		if err != nil || len(u.Removed)+len(u.Added) != 0 || !slices.Equal(ids(u.Instances()), []string{"a", "b"}) {
			t.Fatalf("after b came back: %+v %v, want [a b] with no removal", u, err)
		}
		if !u.Stale {
			return // fresh once the window closed
		}
	}
}

// An instance that does not come back is removed when the grace ends, and
// the watcher is fresh again.
func TestResyncGraceEndsWithTheRemoval(t *testing.T) {
	ctx := testCtx(t)
	r := registry.New(graceBackend(nil), fastOpts(50*time.Millisecond))
	defer r.Close()
	w, _ := r.Watch(ctx, "s")
	for {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Removed) > 0 {
			if u.Stale || !slices.Equal(ids(u.Removed), []string{"b"}) || !slices.Equal(ids(u.Instances()), []string{"a"}) {
				t.Fatalf("removal update %+v", u)
			}
			return
		}
	}
}

func pausedRegistry(t *testing.T, callTimeout time.Duration) (*memory.Server, registry.Registry) {
	srv := memory.NewServer()
	r := memory.New(srv, &memory.Options{TTL: time.Hour, Registry: registry.Options{CallTimeout: callTimeout,
		Backoff: registry.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}}})
	t.Cleanup(func() { srv.Resume(); r.Close() })
	return srv, r
}

// Every call the shared layer makes is bounded: against a frozen server,
// calls with context.Background fail with ErrUnavailable.
func TestCallsAreBoundedWhileServerFrozen(t *testing.T) {
	srv, r := pausedRegistry(t, 200*time.Millisecond)
	reg, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	bg := context.Background()
	if _, err := r.Register(bg, registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"}); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Register: %v, want ErrUnavailable", err)
	}
	if _, err := r.Lookup(bg, "s"); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Lookup: %v, want ErrUnavailable", err)
	}
	if err := r.Ping(bg); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Ping: %v, want ErrUnavailable", err)
	}
	if _, err := r.Services(bg); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Services: %v, want ErrUnavailable", err)
	}
	if err := reg.Update(bg, registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:9"}); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Update: %v, want ErrUnavailable", err)
	}
	w, err := r.Watch(bg, "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u, err := w.Next(testCtx(t))
	if err != nil || !u.Stale || u.Synced || !errors.Is(u.Err, registry.ErrUnavailable) {
		t.Fatalf("first update of a watch opened while frozen: %+v, %v; want stale, not synced, ErrUnavailable", u, err)
	}
}

// A Deregister that fails during an outage is retried until it succeeds:
// no ghost is left, and Status says what is going on.
func TestDeregisterDuringOutageIsCompletedLater(t *testing.T) {
	srv, r := pausedRegistry(t, 100*time.Millisecond)
	reg, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := reg.Deregister(short); err == nil {
		t.Fatal("Deregister against a frozen server returned nil")
	}
	testutil.WaitFor(t, 10*time.Second, "a failed withdrawal in Status", func() bool {
		s := reg.Status()
		return s.State == registry.Withdrawing && s.Err != nil
	})
	srv.Resume()
	if err := reg.Deregister(testCtx(t)); err != nil {
		t.Fatalf("second Deregister once the server is back: %v", err)
	}
	if s := reg.Status(); s.State != registry.Deregistered || s.Err != nil {
		t.Fatalf("status %+v, want deregistered", s)
	}
	other := memory.New(srv, nil)
	defer other.Close()
	if l, err := other.Lookup(testCtx(t), "s"); err != nil || len(l) != 0 {
		t.Fatalf("after the withdrawal: %v %v, want no instance", l, err)
	}
}

// hangingPub is a publication whose Update and Withdraw hang until their
// context ends, as calls to a frozen server do.
type hangingPub struct {
	driver.Loss
	updating chan struct{}
}

func (p *hangingPub) Update(ctx context.Context, _ driver.Instance) error {
	close(p.updating)
	<-ctx.Done()
	return ctx.Err()
}
func (p *hangingPub) Withdraw(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }

// An Update stuck on a frozen server does not hold Deregister: Deregister
// cuts it short (before, Update held the registration's lock for as long
// as its caller's context allowed).
func TestDeregisterCutsAnUpdateShort(t *testing.T) {
	p := &hangingPub{updating: make(chan struct{})}
	b := &scripted{publish: func(context.Context, driver.Instance) (driver.Publication, error) { return p, nil }}
	r := registry.New(b, &registry.Options{CallTimeout: time.Hour, CloseTimeout: 100 * time.Millisecond})
	defer r.Close()
	reg, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	upd := make(chan error, 1)
	go func() {
		upd <- reg.Update(context.Background(), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:2"})
	}()
	<-p.updating
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := reg.Deregister(short); err == nil {
		t.Fatal("Deregister with a hanging withdrawal returned nil")
	}
	if err := <-upd; !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("Update cut short by Deregister: %v, want ErrClosed", err)
	}
}

func TestSecondRegisterOfLiveIDIsAConflict(t *testing.T) {
	ctx := testCtx(t)
	r := memory.New(memory.NewServer(), nil)
	defer r.Close()
	in := registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}
	reg, err := r.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	in.Addr = "127.0.0.1:2"
	if _, err := r.Register(ctx, in); !errors.Is(err, registry.ErrConflict) {
		t.Fatalf("second Register of a live ID: %v, want ErrConflict", err)
	}
	if err := reg.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(ctx, in); err != nil {
		t.Fatalf("Register after Deregister: %v", err)
	}
}

// flappy is a backend whose every publication is lost at once, as when two
// registrars fight over one ID.
type flappy struct {
	scripted
	n atomic.Int32
}

type lostPub struct{ driver.Loss }

func (*lostPub) Update(context.Context, driver.Instance) error { return nil }
func (*lostPub) Withdraw(context.Context) error                { return nil }

// Backoff grows across consecutive losses: a publication lost right after
// it was made is not republished in a tight loop.
func TestBackoffGrowsAcrossConsecutiveLosses(t *testing.T) {
	f := &flappy{}
	f.publish = func(context.Context, driver.Instance) (driver.Publication, error) {
		f.n.Add(1)
		p := &lostPub{}
		if f.n.Load() > 1 {
			p.Lose(errors.New("overwritten by someone else"))
		} else {
			time.AfterFunc(time.Millisecond, func() { p.Lose(errors.New("overwritten by someone else")) })
		}
		return p, nil
	}
	r := registry.New(f, &registry.Options{Backoff: registry.Backoff{Min: 20 * time.Millisecond, Max: time.Minute}})
	defer r.Close()
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	// Delays 10-20, 20-40, 40-80, 80-160, 160-320, 320-640 ms...: within
	// 1.5 s at most 8 publications; without growth it would be about 100.
	time.Sleep(1500 * time.Millisecond) // the span being observed
	if n := f.n.Load(); n > 9 {
		t.Fatalf("%d publications in 1.5s: backoff does not grow across losses", n)
	}
}

func TestAddresses(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:8080", "[::]:8080"} {
		err := (registry.Instance{Service: "s", ID: "a", Addr: addr}).Validate()
		if !errors.Is(err, registry.ErrInvalidInstance) || !strings.Contains(err.Error(), "wildcard") {
			t.Errorf("Validate(%s) = %v, want an error naming the wildcard address", addr, err)
		}
	}
	if err := (registry.Instance{Service: "s", Addr: "[2001:db8::1]:8080"}).Validate(); err != nil {
		t.Errorf("IPv6 address without an ID: %v", err)
	}
}

func TestOpenErrorsHideSecrets(t *testing.T) {
	_, err := registry.Open(context.Background(), "//agent:8500/?token=abc123")
	if err == nil || strings.Contains(err.Error(), "abc123") {
		t.Fatalf("Open error %v reveals the token", err)
	}
}

// Consul's shape: the first list after an outage is complete, and only then
// does the server fire the TTLs that ran out during the outage (removals),
// followed at once by the renewals. The removals are held back for the
// grace and never delivered.
func TestResyncGraceHoldsRemovalsAfterACompleteFirstList(t *testing.T) {
	ctx := testCtx(t)
	renewed := make(chan struct{})
	a, b := di("a", "127.0.0.1:1"), di("b", "127.0.0.1:2")
	sc := &scripted{streams: [][]scriptStep{
		{{ev: driver.ResetEvent([]driver.Instance{a, b})}, {err: errors.New("outage")}},
		{
			{ev: driver.ResetEvent([]driver.Instance{a, b})},
			{ev: driver.ResetEvent([]driver.Instance{b})},
			{ev: driver.ChangeEvent(driver.Delete("b"))},
			{wait: renewed},
			{ev: driver.ResetEvent([]driver.Instance{a, b})},
		},
	}}
	r := registry.New(sc, fastOpts(300*time.Millisecond))
	defer r.Close()
	w, _ := r.Watch(ctx, "s")
	sawHold := false
	for {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Removed) > 0 {
			t.Fatalf("removed %v right after an outage: a TTL blip must not reach users", ids(u.Removed))
		}
		if u.Stale && u.Synced && u.Err != nil && strings.Contains(u.Err.Error(), "resynchronising") {
			sawHold = true
			if !slices.Equal(ids(u.Instances()), []string{"a", "b"}) {
				t.Fatalf("held update shows %v", ids(u.Instances()))
			}
			select {
			case <-renewed:
			default:
				close(renewed)
			}
			continue
		}
		if sawHold && !u.Stale {
			if !slices.Equal(ids(u.Instances()), []string{"a", "b"}) {
				t.Fatalf("after the renewals: %v", ids(u.Instances()))
			}
			return
		}
	}
}
