package consul_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// seen is one update a watcher delivered, with when.
type seen struct {
	at time.Time
	u  registry.Update
}

// recorder keeps every update a watcher delivers.
type recorder struct {
	mu  sync.Mutex
	all []seen
}

func record(t *testing.T, r registry.Registry, service string) *recorder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			rec.mu.Lock()
			rec.all = append(rec.all, seen{time.Now(), u})
			rec.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); w.Close(); <-done })
	return rec
}

func (r *recorder) since(t time.Time) []seen {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []seen
	for _, s := range r.all {
		if !s.at.Before(t) {
			out = append(out, s)
		}
	}
	return out
}

func (r *recorder) last() (seen, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.all) == 0 {
		return seen{}, false
	}
	return r.all[len(r.all)-1], true
}

func describe(s seen, t0 time.Time) string {
	u := s.u
	return fmt.Sprintf("%+8.3fs stale=%v ids=%v +%v -%v ~%v err=%v", s.at.Sub(t0).Seconds(), u.Stale,
		ids(u.Instances()), ids(u.Added), ids(u.Removed), ids(u.Changed), u.Err)
}

// The agent frozen (SIGSTOP) for longer than the TTL: its TTL check fires
// critical the moment it runs again, and the registrar's renewal, in flight
// since the agent stopped answering, makes it pass again moments later. The
// watcher's blocking query must have ended during the pause (stale), and
// every update after the resume is checked: no non-stale update misses an
// instance, the final list is exact, and it stays exact. The registrar
// renewed instead of registering again.
func TestWatchAcrossPauseLongerThanTTL(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const ttl = 2 * time.Second
	registrar, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
	watcher, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
	const svc = "frozen"
	want := []string{"c1", "c2"}
	var regs []*registry.Registration
	for i, id := range want {
		reg, err := registrar.Register(ctxFor(t, 10*time.Second), instance(svc, id, 9001+i))
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, reg)
	}
	rec := record(t, watcher, svc)
	exact := func(s seen) bool { return !s.u.Stale && slices.Equal(ids(s.u.Instances()), want) }
	waitUntil(t, 10*time.Second, "both instances", func() bool { s, ok := rec.last(); return ok && exact(s) })

	srv.Pause()
	paused := time.Now()
	waitUntil(t, 30*time.Second, "the watcher to go stale", func() bool { s, ok := rec.last(); return ok && s.u.Stale })
	staleAfter := time.Since(paused)
	// The outage being simulated: twice the TTL, and at least 1s more
	// than it took the watcher to notice.
	time.Sleep(max(2*ttl, staleAfter+time.Second) - time.Since(paused))
	srv.Resume()
	resumed := time.Now()
	t.Logf("paused %v; the watcher went stale %v after the pause began", resumed.Sub(paused).Round(time.Millisecond), staleAfter.Round(time.Millisecond))

	// Server side: the session check passes again, and when.
	admin := newClient(t, srv.Addr(), newCutTransport())
	var passingAfter time.Duration
	waitUntil(t, 20*time.Second, "the session check to pass", func() bool {
		checks, err := admin.Agent().ChecksWithFilterOpts(`ServiceName == "rollcall-session"`, qopts(t))
		if err != nil || len(checks) != 1 {
			return false
		}
		for _, c := range checks {
			if c.Status == api.HealthPassing {
				passingAfter = time.Since(resumed)
				return true
			}
		}
		return false
	})
	waitUntil(t, 30*time.Second, "the watcher to show both instances, fresh", func() bool { s, ok := rec.last(); return ok && exact(s) })
	fresh := time.Since(resumed)
	// Stays exact: watch a while longer (an observation window, not a wait).
	time.Sleep(3 * ttl)
	after := rec.since(resumed)
	var lines []string
	for _, s := range after {
		lines = append(lines, describe(s, resumed))
	}
	t.Logf("session check passing %v after the resume (server-side read); watcher exact and fresh %v after; updates after the resume:\n%s",
		passingAfter.Round(time.Millisecond), fresh.Round(time.Millisecond), strings.Join(lines, "\n"))
	for _, s := range after {
		if !s.u.Stale && !exact(s) {
			t.Errorf("a fresh update after the resume is not the exact list: %s", describe(s, resumed))
		}
		if len(s.u.Removed) > 0 {
			t.Errorf("an update after the resume removes instances: %s", describe(s, resumed))
		}
	}
	if s, _ := rec.last(); !exact(s) {
		t.Errorf("final update %s, want %v fresh", describe(s, resumed), want)
	}
	for i, reg := range regs {
		st := reg.Status()
		t.Logf("registration %s: %+v", want[i], st)
		if st.State != registry.Registered {
			t.Errorf("registration %s is %v after the pause", want[i], st.State)
		}
		if st.Reregistrations != 0 {
			t.Errorf("registration %s was registered again %d times: the renewal should have brought it back", want[i], st.Reregistrations)
		}
	}
}

// Calls against an address where nothing listens fail at once with
// ErrUnavailable and the cause, not after a timeout.
func TestCallsFailFastWhereNothingListens(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	r, _ := newRegistry(t, addr, consul.Options{TTL: 2 * time.Second})
	check := func(what string, err error) {
		t.Helper()
		switch {
		case err == nil:
			t.Errorf("%s succeeded with nothing listening", what)
		case !errors.Is(err, registry.ErrUnavailable):
			t.Errorf("%s: %v, want ErrUnavailable", what, err)
		case errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "connection refused"):
			t.Errorf("%s: %v, want the cause (connection refused), not a timeout", what, err)
		}
	}
	// Contexts far longer than a failure takes: a call that waited for
	// them would show as DeadlineExceeded.
	_, err = r.Register(ctxFor(t, time.Minute), instance("nobody", "a", 9001))
	check("Register", err)
	check("Ping", r.Ping(ctxFor(t, time.Minute)))
	_, err = r.Lookup(ctxFor(t, time.Minute), "nobody")
	check("Lookup", err)
	ch := watchUpdates(t, r, "nobody")
	u := nextUpdate(t, ch, 30*time.Second, "the first update", func(registry.Update) bool { return true })
	if !u.Stale || u.Synced {
		t.Errorf("first update of a watch with nothing listening: %+v, want stale and not synced", u)
	}
	check("the first watch update", u.Err)
}
