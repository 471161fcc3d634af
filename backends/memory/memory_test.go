package memory_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A paused server does not expire leases, but when it resumes, those whose
// TTL ran out meanwhile are gone (as etcd revokes overdue leases): their
// holders register again; a lease with time left is kept.
func TestResumeExpiresOverdueLeases(t *testing.T) {
	ctx := testCtx(t)
	srv := memory.NewServer()
	short := memory.New(srv, &memory.Options{TTL: 300 * time.Millisecond})
	defer short.Close()
	long := memory.New(srv, &memory.Options{TTL: time.Hour})
	defer long.Close()
	a, err := short.Register(ctx, registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := long.Register(ctx, registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	paused := time.Now()
	testutil.WaitFor(t, 5*time.Second, "the pause to outlast the short TTL", func() bool {
		return time.Since(paused) > 600*time.Millisecond // the outage itself
	})
	if a.Status().Reregistrations != 0 {
		t.Fatalf("a lease expired while the server was paused: %+v", a.Status())
	}
	srv.Resume()
	testutil.WaitFor(t, 10*time.Second, "the registrar of the expired lease to register again", func() bool {
		s := a.Status()
		return s.State == registry.Registered && s.Reregistrations == 1
	})
	if s := b.Status(); s.State != registry.Registered || s.Reregistrations != 0 {
		t.Fatalf("the lease with time left was lost: %+v", s)
	}
}

// An ID held by another client's live lease is refused at another address
// and taken over at the same address (a restarted process).
func TestPublishRefusesAnIDHeldAtAnotherAddress(t *testing.T) {
	ctx := testCtx(t)
	srv := memory.NewServer()
	r1 := memory.New(srv, &memory.Options{TTL: time.Hour})
	defer r1.Close()
	r2 := memory.New(srv, &memory.Options{TTL: time.Hour})
	defer r2.Close()
	if _, err := r1.Register(ctx, registry.Instance{Service: "s", ID: "x", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	_, err := r2.Register(ctx, registry.Instance{Service: "s", ID: "x", Addr: "127.0.0.1:2"})
	if !errors.Is(err, registry.ErrConflict) || !errors.Is(err, memory.ErrConflict) {
		t.Fatalf("Register of an ID held at another address: %v, want ErrConflict", err)
	}
	list, err := r2.Lookup(ctx, "s")
	if err != nil || len(list) != 1 || list[0].Addr != "127.0.0.1:1" {
		t.Fatalf("Lookup = %v, %v; want the first registration kept", list, err)
	}
	r1.Crash() // the first process dies; its lease lives on for its TTL
	if _, err := r2.Register(ctx, registry.Instance{Service: "s", ID: "x", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatalf("Register of an ID held at the same address (a restarted process): %v", err)
	}
}

// A restricted user's calls are refused with ErrPermission, not as an
// outage; Ping answers.
func TestRestrictedUserIsRefused(t *testing.T) {
	ctx := testCtx(t)
	srv := memory.NewServer()
	srv.Restrict("guest")
	r := memory.New(srv, &memory.Options{User: "guest"})
	defer r.Close()
	_, err := r.Register(ctx, registry.Instance{Service: "s", ID: "x", Addr: "127.0.0.1:1"})
	if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("Register as a restricted user: %v, want ErrPermission", err)
	}
	if _, err := r.Lookup(ctx, "s"); !errors.Is(err, memory.ErrPermissionDenied) {
		t.Fatalf("Lookup as a restricted user: %v, want ErrPermissionDenied", err)
	}
	if err := r.Ping(ctx); err != nil {
		t.Fatalf("Ping as a restricted user: %v", err)
	}
}
