package consul_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// dupWindow is how long the writes of two registrars of one instance are
// counted.
const dupWindow = 10 * time.Second

// One instance (service and ID) registered by two Registries: at another
// address it is refused with ErrConflict, at the same address it is taken
// over and the first registrar stands back; on two nodes it is refused. In
// no case do the registrars write in a loop.
func TestDuplicateIDIsRefusedOrStable(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const ttl = 2 * time.Second
	addrs := func(s seen) []string {
		var out []string
		for _, in := range s.u.Instances() {
			out = append(out, in.Addr)
		}
		return out
	}

	t.Run("same-agent-other-address", func(t *testing.T) {
		const svc = "dup-addr"
		r1, tr1 := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		r2, tr2 := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		observer, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		reg1, err := r1.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7001))
		if err != nil {
			t.Fatal(err)
		}
		rec := record(t, observer, svc)
		waitUntil(t, 10*time.Second, "the first registration", func() bool {
			s, ok := rec.last()
			return ok && slices.Equal(addrs(s), []string{"127.0.0.1:7001"})
		})
		start := time.Now()
		before := tr1.regs.Load() + tr2.regs.Load()
		_, err = r2.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7002))
		if !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("second Register at another address: %v, want ErrConflict", err)
		}
		t.Logf("second Register: %v", err)
		time.Sleep(dupWindow) // the span whose writes are counted
		writes := tr1.regs.Load() + tr2.regs.Load() - before
		t.Logf("service registrations by both registrars in %v: %d", dupWindow, writes)
		if writes > 3 {
			t.Errorf("%d service registrations in %v: a write loop", writes, dupWindow)
		}
		for _, s := range rec.since(start) {
			if a := addrs(s); !slices.Equal(a, []string{"127.0.0.1:7001"}) {
				t.Errorf("the watcher saw %v (stale %v): the refused registration changed the instance", a, s.u.Stale)
			}
		}
		if st := reg1.Status(); st.State != registry.Registered || st.Reregistrations != 0 {
			t.Errorf("first registration: %+v", st)
		}
	})

	t.Run("same-agent-same-address", func(t *testing.T) {
		const svc = "dup-same"
		r1, tr1 := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		r2, tr2 := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		reg1, err := r1.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7011))
		if err != nil {
			t.Fatal(err)
		}
		// The same endpoint (a restarted process, say): taken over.
		reg2, err := r2.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7011))
		if err != nil {
			t.Fatalf("second Register at the same address: %v, want it taken over", err)
		}
		waitUntil(t, 20*time.Second, "the first registrar to find it taken over", func() bool {
			s := reg1.Status()
			return s.State == registry.Retrying && errors.Is(s.Err, registry.ErrConflict)
		})
		t.Logf("first registration: %+v", reg1.Status())
		before := tr1.regs.Load() + tr2.regs.Load()
		time.Sleep(dupWindow) // the span whose writes are counted
		writes := tr1.regs.Load() + tr2.regs.Load() - before
		t.Logf("service registrations by both registrars in %v: %d", dupWindow, writes)
		if writes > 3 {
			t.Errorf("%d service registrations in %v: a write loop", writes, dupWindow)
		}
		if st := reg2.Status(); st.State != registry.Registered || st.Reregistrations != 0 {
			t.Errorf("the registration that took over: %+v", st)
		}
		if st := reg1.Status(); st.State != registry.Retrying || !errors.Is(st.Err, registry.ErrConflict) {
			t.Errorf("the registration taken over: %+v, want retrying with ErrConflict", st)
		}
		// The holder goes: the first registrar takes the instance back.
		if err := reg2.Deregister(ctxFor(t, 10*time.Second)); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 30*time.Second, "the first registrar to register it again", func() bool {
			s := reg1.Status()
			return s.State == registry.Registered && s.Reregistrations >= 1
		})
		list, err := r1.Lookup(ctxFor(t, 10*time.Second), svc)
		if err != nil || len(list) != 1 {
			t.Fatalf("Lookup after the take-back: %v, %v", list, err)
		}
	})

	t.Run("two-nodes", func(t *testing.T) {
		const svc = "dup-nodes"
		client := testserver.StartConsulServerWith(t, testserver.ConsulServerOptions{Join: srv})
		r1, tr1 := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
		r2, tr2 := newRegistry(t, client.Addr(), consul.Options{TTL: ttl})
		if _, err := r1.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7021)); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 10*time.Second, "the instance in the catalog, seen from the other node", func() bool {
			list, err := r2.Lookup(ctxFor(t, 5*time.Second), svc)
			return err == nil && len(list) == 1
		})
		before := tr1.regs.Load() + tr2.regs.Load()
		_, err := r2.Register(ctxFor(t, 10*time.Second), instance(svc, "same", 7022))
		if !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("Register on another node at another address: %v, want ErrConflict", err)
		}
		t.Logf("Register on another node: %v", err)
		// The same endpoint from another node is allowed (two entries, one
		// address).
		if _, err := r2.Register(ctxFor(t, 10*time.Second), instance(svc, "other", 7023)); err != nil {
			t.Fatalf("Register of another ID on the other node: %v", err)
		}
		writes := tr1.regs.Load() + tr2.regs.Load() - before
		t.Logf("service registrations: %d (the second node's session and its other instance)", writes)
		if writes > 3 {
			t.Errorf("%d service registrations", writes)
		}
	})
}
