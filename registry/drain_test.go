package registry_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/registry"
)

func drainCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// nextUpdate returns w's next update within the test's deadline.
func nextUpdate(t *testing.T, w *registry.Watcher) registry.Update {
	t.Helper()
	u, err := w.Next(drainCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// SetServing(false) takes an instance out of every client's view while it
// stays registered; SetServing(true) brings it back; a watcher sees a
// removal and an addition.
func TestSetServing(t *testing.T) {
	ctx := drainCtx(t)
	srv := memory.NewServer()
	server, client := memory.New(srv, nil), memory.New(srv, nil)
	defer server.Close()
	defer client.Close()
	a, err := server.Register(ctx, registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1", Metadata: map[string]string{"zone": "z"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.Register(ctx, registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"}); err != nil {
		t.Fatal(err)
	}
	w, err := client.Watch(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if u := nextUpdate(t, w); len(u.Added) != 2 {
		t.Fatalf("first update %v", u.String())
	}
	if err := a.SetServing(ctx, false); err != nil {
		t.Fatal(err)
	}
	if u := nextUpdate(t, w); len(u.Removed) != 1 || u.Removed[0].ID != "a" || len(u.Added)+len(u.Changed) != 0 {
		t.Fatalf("after SetServing(false): %v, want a removed", u.String())
	}
	if list, err := client.Lookup(ctx, "s"); err != nil || strings.Join(ids(list), ",") != "b" {
		t.Fatalf("Lookup after SetServing(false) = %v, %v; want b only", ids(list), err)
	}
	if st := a.Status(); st.State != registry.Registered {
		t.Fatalf("a paused instance is %v, want registered", st)
	}
	if err := a.SetServing(ctx, true); err != nil {
		t.Fatal(err)
	}
	u := nextUpdate(t, w)
	if len(u.Added) != 1 || u.Added[0].ID != "a" || u.Added[0].Zone() != "z" {
		t.Fatalf("after SetServing(true): %v, want a added with its metadata", u.String())
	}
	if _, ok := u.Added[0].Metadata[registry.MetaServing]; ok {
		t.Fatalf("a serving instance carries %s: %v", registry.MetaServing, u.Added[0].Metadata)
	}
	// A paused instance missing from a resync after an outage is removed
	// at once, not held back as a possibly renewing one.
	if err := a.SetServing(ctx, false); err != nil {
		t.Fatal(err)
	}
	if u := nextUpdate(t, w); len(u.Removed) != 1 {
		t.Fatalf("after the second SetServing(false): %v", u.String())
	}
}

// Drain returns only once the registry no longer lists the instance; its
// status is Deregistered, and StatusChanged told of each transition.
func TestDrain(t *testing.T) {
	ctx := drainCtx(t)
	srv := memory.NewServer()
	server, client := memory.New(srv, nil), memory.New(srv, nil)
	defer server.Close()
	defer client.Close()
	a, err := server.Register(ctx, registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	changed := a.StatusChanged()
	select {
	case <-changed:
		t.Fatal("StatusChanged closed with no change")
	default:
	}
	if err := a.Drain(ctx, -1); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("StatusChanged not closed after Drain")
	}
	if st := a.Status(); st.State != registry.Deregistered || !strings.HasPrefix(st.String(), "deregistered since ") {
		t.Fatalf("status after Drain: %v", st)
	}
	if list, err := client.Lookup(ctx, "s"); err != nil || len(list) != 0 {
		t.Fatalf("Lookup after Drain = %v, %v", ids(list), err)
	}
}

// Drain against a registry that does not answer returns within its ctx,
// saying the withdrawal goes on.
func TestDrainIsBoundedByCtx(t *testing.T) {
	ctx := drainCtx(t)
	srv := memory.NewServer()
	server := memory.New(srv, nil)
	defer server.Close()
	a, err := server.Register(ctx, registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	defer srv.Resume()
	dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	err = a.Drain(dctx, 0)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "background") {
		t.Fatalf("Drain of a frozen registry: %v, want the deadline, the withdrawal going on", err)
	}
	if st := a.Status(); st.State != registry.Withdrawing {
		t.Fatalf("status: %v, want withdrawing", st)
	}
	srv.Resume()
	if err := a.Deregister(ctx); err != nil {
		t.Fatalf("the withdrawal after the registry came back: %v", err)
	}
}
