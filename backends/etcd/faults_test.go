package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// idleRegistry is one Registry that both registers and watches, as a
// server that is also a client does: its key guard and its watch share the
// client.
func idleRegistry(t *testing.T, ep string, o etcd.Options) registry.Registry {
	t.Helper()
	cli := newClient(t, ep)
	t.Cleanup(func() { cli.Close() })
	r, err := etcd.New(cli, &o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// watchIdle reads w for d and fails on any update: nothing changes.
func watchIdle(t *testing.T, w *registry.Watcher, d time.Duration, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var got []registry.Update
	start := time.Now()
	for {
		u, err := w.Next(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatalf("%s: Next: %v", what, err)
		}
		t.Logf("%s: update after %v: stale=%v err=%v ids=%v", what, time.Since(start).Round(time.Millisecond), u.Stale, u.Err, ids(u))
		got = append(got, u)
	}
	if len(got) > 0 {
		t.Fatalf("%s: %d updates while nothing changed for %v:\n%s", what, len(got), d, describe(got))
	}
}

// TestIdleWatcherStaysFresh: on a healthy etcd, a service nobody changes
// gets no update at all for 20s after the first list: no stale update, no
// relist, with the default progress settings (the watch asks for progress
// every 2s). Its registrar lives in the same Registry, so the key guard's
// watch and the service's watch share the client.
func TestIdleWatcherStaysFresh(t *testing.T) {
	srv := testserver.StartEtcd(t)
	lg, logger := newLogs()
	r := idleRegistry(t, srv.Endpoint(), etcd.Options{TTL: 5 * time.Second, Logger: logger})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reg, err := r.Register(ctx, registry.Instance{Service: "idle", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	w, err := r.Watch(ctx, "idle")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u, err := w.Next(ctx)
	if err != nil || u.Stale || !slices.Equal(ids(u), []string{"a"}) {
		t.Fatalf("first update: %+v, %v", u, err)
	}
	watchIdle(t, w, 20*time.Second, "idle service")
	relists := len(lg.find(slog.LevelWarn, "watch failed")) + len(lg.find(slog.LevelInfo, "listed again"))
	t.Logf("relists in 20s idle: %d", relists)
	if relists != 0 {
		t.Fatalf("%d relists of an idle service on a healthy server: %v", relists, lg.find(slog.LevelInfo, ""))
	}
	if st := reg.Status(); st.State != registry.Registered || st.Reregistrations != 0 {
		t.Fatalf("registration: %+v", st)
	}
}

// TestIdleWatcherStaysFreshAfterReconnect: after etcd restarts (data kept)
// clientv3 resumes its watches from the revision after the last one it saw,
// which etcd does not answer progress requests for until something is
// written. Once the watcher has dealt with the restart (it relisted, or
// found the server healthy and watched again from a new list), an idle
// service gets no update for 10s.
func TestIdleWatcherStaysFreshAfterReconnect(t *testing.T) {
	srv := testserver.StartEtcd(t)
	lg, logger := newLogs()
	o := etcd.Options{TTL: 5 * time.Second, Logger: logger, ProgressInterval: 500 * time.Millisecond, ProgressTimeout: time.Second}
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	b := etcd.NewBackend(cli, &o)
	r := registry.New(b, &registry.Options{Logger: logger})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reg, err := r.Register(ctx, registry.Instance{Service: "idle", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	w, err := r.Watch(ctx, "idle")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rec := record(t, w)
	testutil.WaitFor(t, 10*time.Second, "the first update", func() bool { _, ok := rec.last(); return ok })
	// Once the watch has had a progress notification, clientv3 resumes it
	// after the restart from the revision after the server's current one.
	testutil.WaitFor(t, 10*time.Second, "a progress notification", func() bool { return etcd.ProgressNotifications(b) > 0 })
	before := len(rec.all())
	relisted := len(lg.find(slog.LevelInfo, "listed again"))
	srv.Restart(false)
	testutil.WaitFor(t, 30*time.Second, "the watcher to deal with the restart (relisted after a stale update, or listed again)", func() bool {
		if len(lg.find(slog.LevelInfo, "listed again")) > relisted {
			return true
		}
		us := rec.all()[before:]
		stale := slices.IndexFunc(us, func(u registry.Update) bool { return u.Stale })
		return stale >= 0 && slices.ContainsFunc(us[stale:], func(u registry.Update) bool { return !u.Stale })
	})
	mark := len(rec.all())
	time.Sleep(10 * time.Second) // the span over which the service stays idle
	if us := rec.all()[mark:]; len(us) > 0 {
		t.Fatalf("%d updates of an idle service after the watcher was fresh again:\n%s", len(us), describe(us))
	}
	if u, _ := rec.last(); u.Stale || !slices.Equal(ids(u), []string{"a"}) {
		t.Fatalf("last update: stale=%v ids=%v", u.Stale, ids(u))
	}
	if st := reg.Status(); st.State != registry.Registered {
		t.Fatalf("registration: %+v", st)
	}
}

// refusedPort returns a loopback address nothing listens on.
func refusedPort(t *testing.T) string {
	ports, err := testserver.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	return "127.0.0.1:" + strconv.Itoa(ports[0])
}

// TestUnreachableServerFailsFast: against a port where nothing listens,
// Register, Ping, Lookup (all with context.Background()) and a Watch's
// first update end with an error wrapping ErrUnavailable that names the
// cause, instead of waiting for the connection forever.
func TestUnreachableServerFailsFast(t *testing.T) {
	ep := refusedPort(t)
	r, err := registry.Open(context.Background(), "etcd://"+ep+"/?ttl=5s&dial-timeout=1s")
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	closeR := func() {
		if !closed {
			closed = true
			r.Close()
		}
	}
	defer closeR()
	const limit = 20 * time.Second // a hang guard
	check := func(what string, err error, took time.Duration) {
		t.Helper()
		t.Logf("%s against %s (refused): %v after %v", what, ep, err, took.Round(time.Millisecond))
		if !errors.Is(err, registry.ErrUnavailable) || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("%s: %v; want ErrUnavailable naming the cause (connection refused)", what, err)
		}
	}
	err, took := bounded(t, "Register", limit, closeR, func() error {
		_, err := r.Register(context.Background(), registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9001"})
		return err
	})
	check("Register", err, took)
	err, took = bounded(t, "Ping", limit, closeR, func() error { return r.Ping(context.Background()) })
	check("Ping", err, took)
	err, took = bounded(t, "Lookup", limit, closeR, func() error { _, err := r.Lookup(context.Background(), "svc"); return err })
	check("Lookup", err, took)
	w, err := r.Watch(context.Background(), "svc")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var u registry.Update
	err, took = bounded(t, "the first Watch update", limit, closeR, func() error {
		var err error
		u, err = w.Next(context.Background())
		return err
	})
	if err != nil {
		t.Fatalf("Next: %v", err)
	}
	t.Logf("first Watch update: stale=%v synced=%v err=%v after %v", u.Stale, u.Synced, u.Err, took.Round(time.Millisecond))
	if !u.Stale || u.Synced {
		t.Errorf("first update %+v; want stale, not synced", u)
	}
	check("the first Watch update's Err", u.Err, took)
}

// TestPausedServerCallsEnd: against a frozen etcd (SIGSTOP: the kernel
// still accepts connections, nothing answers), calls with
// context.Background() end with ErrUnavailable, not hang: on a client made
// during the freeze, after dial-timeout (the connection's handshake never
// completes); on a client connected before, once keepalive pings notice
// the dead connection.
func TestPausedServerCallsEnd(t *testing.T) {
	srv := testserver.StartEtcd(t)
	ctx := context.Background()
	warm, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+"/?ttl=5s&dial-timeout=1s")
	if err != nil {
		t.Fatal(err)
	}
	defer warm.Close()
	if err := warm.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	fresh, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+"/?ttl=5s&dial-timeout=1s")
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	srv.Pause()
	paused := true
	resume := func() {
		if paused {
			paused = false
			srv.Resume()
		}
	}
	defer resume()
	const limit = 40 * time.Second // a hang guard
	for _, c := range []struct {
		name string
		r    registry.Registry
	}{{"client made during the freeze", fresh}, {"client connected before", warm}} {
		for _, op := range []struct {
			name string
			fn   func() error
		}{
			{"Ping", func() error { return c.r.Ping(ctx) }},
			{"Lookup", func() error { _, err := c.r.Lookup(ctx, "svc"); return err }},
			{"Register", func() error {
				_, err := c.r.Register(ctx, registry.Instance{Service: "svc", ID: "x", Addr: "127.0.0.1:9001"})
				return err
			}},
		} {
			err, took := bounded(t, op.name+" on the "+c.name, limit, resume, op.fn)
			t.Logf("%s on the %s (paused): %v after %v", op.name, c.name, err, took.Round(time.Millisecond))
			if !errors.Is(err, registry.ErrUnavailable) {
				t.Errorf("%s on the %s: %v; want ErrUnavailable", op.name, c.name, err)
			}
			// A new connection to a frozen server never completes its
			// handshake: the error says so, not only that time ran out.
			if c.r == fresh && !strings.Contains(err.Error(), "no connection") {
				t.Errorf("%s on the %s: %v; want the connection's error", op.name, c.name, err)
			}
		}
	}
}

// TestWatchOutlivesItsOpeningContext: the context given to Watch bounds
// opening the watch only; the stream goes on after it ends.
func TestWatchOutlivesItsOpeningContext(t *testing.T) {
	srv := testserver.StartEtcd(t)
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	b := etcd.NewBackend(cli, &etcd.Options{TTL: 5 * time.Second})
	defer b.Close()
	octx, ocancel := context.WithTimeout(context.Background(), 5*time.Second)
	st, err := b.Watch(octx, "svc")
	ocancel()
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if ev, err := st.Next(ctx); err != nil || !ev.Reset {
		t.Fatalf("first event %+v, %v", ev, err)
	}
	pub, err := b.Publish(ctx, driver.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Withdraw(context.Background())
	ev, err := st.Next(ctx)
	if err != nil {
		t.Fatalf("Next after the opening context ended: %v", err)
	}
	if len(ev.Changes) != 1 || ev.Changes[0].Instance == nil || ev.Changes[0].ID != "a" {
		t.Fatalf("event %+v; want a put of a", ev)
	}
}

// dupRegistry opens a Registry from a URL, as a separate process would.
func dupRegistry(t *testing.T, ep string) registry.Registry {
	t.Helper()
	r, err := registry.Open(context.Background(), "etcd://"+ep+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestDuplicateIDAtAnotherAddressIsRefused: a second registrar of an ID
// another live registrar holds at another address gets ErrConflict naming
// the holder and writes nothing; the two never fight over the key.
func TestDuplicateIDAtAnotherAddressIsRefused(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	key := etcd.DefaultPrefix + "dupsvc/same"
	puts := countPuts(t, admin, key)
	r1, r2 := dupRegistry(t, srv.Endpoint()), dupRegistry(t, srv.Endpoint())
	reg1, err := r1.Register(ctx, registry.Instance{Service: "dupsvc", ID: "same", Addr: "127.0.0.1:7001"})
	if err != nil {
		t.Fatal(err)
	}
	lease := leaseOf(ctx, t, admin, key)
	_, err = r2.Register(ctx, registry.Instance{Service: "dupsvc", ID: "same", Addr: "127.0.0.1:7002"})
	t.Logf("second Register: %v", err)
	if !errors.Is(err, registry.ErrConflict) || !strings.Contains(err.Error(), fmt.Sprintf("%x", lease)) {
		t.Errorf("second Register at another address: %v; want ErrConflict naming lease %x", err, lease)
	}
	time.Sleep(10 * time.Second) // the span over which PUTs are counted
	n := puts()
	t.Logf("PUTs of the contested key in 10s: %d", n)
	if n > 2 {
		t.Errorf("%d PUTs of the contested key in 10s: the registrars fight over it", n)
	}
	if got := leaseOf(ctx, t, admin, key); got != lease {
		t.Errorf("the key carries lease %x, want the first holder's %x", got, lease)
	}
	if st := reg1.Status(); st.State != registry.Registered || st.Reregistrations != 0 {
		t.Errorf("first registration: %+v", st)
	}
}

// TestDuplicateIDAtTheSameAddressIsTakenOverOnce: a registrar that
// publishes an ID another live registrar holds at the same address (a
// restarted process taking over its own endpoint) takes it over, once; the
// one it was taken from reports ErrConflict and does not take it back;
// when the new holder leaves, the old one registers it again.
func TestDuplicateIDAtTheSameAddressIsTakenOverOnce(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	key := etcd.DefaultPrefix + "dupsvc/same"
	puts := countPuts(t, admin, key)
	r1, r2 := dupRegistry(t, srv.Endpoint()), dupRegistry(t, srv.Endpoint())
	in := registry.Instance{Service: "dupsvc", ID: "same", Addr: "127.0.0.1:7001"}
	reg1, err := r1.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	old := leaseOf(ctx, t, admin, key)
	reg2, err := r2.Register(ctx, in)
	if err != nil {
		t.Fatalf("Register of the same endpoint by another registrar: %v; want a takeover", err)
	}
	time.Sleep(10 * time.Second) // the span over which PUTs are counted
	n := puts()
	t.Logf("PUTs of the contested key in 10s: %d; first registration: %+v", n, reg1.Status())
	if n > 3 {
		t.Errorf("%d PUTs of the contested key in 10s: the registrars fight over it", n)
	}
	if got := leaseOf(ctx, t, admin, key); got == old {
		t.Errorf("the key still carries the first holder's lease %x", old)
	}
	if st := reg2.Status(); st.State != registry.Registered {
		t.Errorf("the registration that took over: %+v", st)
	}
	if st := reg1.Status(); st.State == registry.Registered || !errors.Is(st.Err, registry.ErrConflict) {
		t.Errorf("the registration taken over: %+v; want not registered, with ErrConflict", st)
	}
	// The new holder leaves: the old one comes back by itself.
	if err := reg2.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, reg1, 60*time.Second, "the first registration to be registered again", func(st registry.Status) bool {
		return st.State == registry.Registered
	})
	if got := leaseOf(ctx, t, admin, key); got == 0 {
		t.Errorf("the key has no lease")
	}
}

// TestUpdateDoesNotOverwriteAnotherHolder: an Update of a publication
// whose key someone else now holds loses the publication instead of
// writing over the other holder.
func TestUpdateDoesNotOverwriteAnotherHolder(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	b := etcd.NewBackend(cli, &etcd.Options{TTL: 5 * time.Second})
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pub, err := b.Publish(ctx, driver.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Withdraw(context.Background())
	other, err := admin.Grant(ctx, 30)
	if err != nil {
		t.Fatal(err)
	}
	key := etcd.DefaultPrefix + "svc/a"
	const theirs = `{"Addr":"127.0.0.1:9999"}`
	if _, err := admin.Put(ctx, key, theirs, clientv3.WithLease(other.ID)); err != nil {
		t.Fatal(err)
	}
	_ = pub.Update(ctx, driver.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9002"})
	select {
	case <-pub.Lost():
	case <-time.After(10 * time.Second):
		t.Fatal("the publication was not lost")
	}
	resp, err := admin.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != theirs || clientv3.LeaseID(resp.Kvs[0].Lease) != other.ID {
		t.Fatalf("the key after Update: %v; want the other holder's value and lease", resp.Kvs)
	}
}

// TestPermissionDeniedIsReported: valid credentials without a role on the
// registry's prefix make Register, Lookup, Ping and the first Watch update
// report ErrPermission (not ErrUnavailable), promptly; so does a wrong
// password.
func TestPermissionDeniedIsReported(t *testing.T) {
	srv := testserver.StartEtcd(t)
	enableAuth(t, srv.Endpoint(), "s3cret", "nopass")
	ctx := context.Background()
	const limit = 20 * time.Second // a hang guard
	denied := func(what string, err error, took time.Duration) {
		t.Helper()
		t.Logf("%s: %v after %v", what, err, took.Round(time.Millisecond))
		if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) {
			t.Errorf("%s: %v; want ErrPermission, not ErrUnavailable", what, err)
		}
	}
	r, err := registry.Open(ctx, "etcd://nobody:nopass@"+srv.Endpoint()+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	err, took := bounded(t, "Register", limit, nil, func() error {
		_, err := r.Register(ctx, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9001"})
		return err
	})
	denied("Register", err, took)
	err, took = bounded(t, "Lookup", limit, nil, func() error { _, err := r.Lookup(ctx, "svc"); return err })
	denied("Lookup", err, took)
	err, took = bounded(t, "Ping", limit, nil, func() error { return r.Ping(ctx) })
	denied("Ping", err, took)
	w, err := r.Watch(ctx, "svc")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var u registry.Update
	err, took = bounded(t, "the first Watch update", limit, nil, func() error {
		var err error
		u, err = w.Next(ctx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !u.Stale || u.Synced {
		t.Errorf("first update %+v; want stale, not synced", u)
	}
	denied("the first Watch update's Err", u.Err, took)

	bad, err := registry.Open(ctx, "etcd://nobody:wrong@"+srv.Endpoint()+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	err, took = bounded(t, "Ping with a wrong password", limit, nil, func() error { return bad.Ping(ctx) })
	denied("Ping with a wrong password", err, took)
}

// TestTTLRoundingIsLogged: etcd grants whole seconds and at least its
// minimum TTL; when what it grants differs from what was asked, one INFO
// line says both.
func TestTTLRoundingIsLogged(t *testing.T) {
	srv := testserver.StartEtcd(t)
	lg, logger := newLogs()
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	r, err := etcd.New(cli, &etcd.Options{TTL: 500 * time.Millisecond, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, id := range []string{"a", "b"} {
		reg, err := r.Register(ctx, registry.Instance{Service: "svc", ID: id, Addr: "127.0.0.1:9001"})
		if err != nil {
			t.Fatal(err)
		}
		if err := reg.Deregister(ctx); err != nil { // the lease is revoked: the next Register grants another
			t.Fatal(err)
		}
	}
	lines := lg.find(slog.LevelInfo, "TTL")
	t.Logf("%v", lines)
	if len(lines) != 1 || lines[0].attrs["asked"] != "500ms" || lines[0].attrs["granted"] == "" || lines[0].attrs["granted"] == "500ms" {
		t.Fatalf("log lines about the TTL: %v; want one INFO line with asked=500ms and what was granted", lines)
	}
}

// TestWithdrawIsRepeatable: a Withdraw that failed half-way (the key was
// deleted, revoking the lease failed) can be called again: it then revokes
// the lease, and later calls return nil.
func TestWithdrawIsRepeatable(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	cli := newFaultyRevokeClient(t, srv.Endpoint())
	defer cli.Close()
	b := etcd.NewBackend(cli, &etcd.Options{TTL: 30 * time.Second})
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pub, err := b.Publish(ctx, driver.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	err = pub.Withdraw(ctx)
	t.Logf("first Withdraw (LeaseRevoke cut short): %v", err)
	if err == nil {
		t.Fatal("first Withdraw succeeded although revoking the lease failed")
	}
	for i := range 2 {
		if err := pub.Withdraw(ctx); err != nil {
			t.Fatalf("Withdraw #%d again: %v", i+2, err)
		}
	}
	leases, err := admin.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases.Leases) != 0 {
		t.Fatalf("after Withdraw returned nil, %d leases remain", len(leases.Leases))
	}
	resp, err := admin.Get(ctx, etcd.DefaultPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Fatalf("%d keys remain", resp.Count)
	}
}

// TestOutageLongerThanTTL: etcd is frozen for three TTLs, so the lease
// expires on the server when it resumes, and the registrar registers again
// with a new one. Every watcher update is recorded: once the instance is
// back, no fresh update lacks it; the watcher ends fresh with the exact
// list, Lookup has it, the registration is Registered.
func TestOutageLongerThanTTL(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ttl = 2 * time.Second
	registrar, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+"/?ttl="+ttl.String())
	if err != nil {
		t.Fatal(err)
	}
	defer registrar.Close()
	// The observer notices the freeze within about 2.5s.
	observer := idleRegistry(t, srv.Endpoint(), etcd.Options{TTL: ttl, ProgressInterval: 500 * time.Millisecond, ProgressTimeout: time.Second})
	reg, err := registrar.Register(ctx, registry.Instance{Service: "outage", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	key := etcd.DefaultPrefix + "outage/a"
	lease := leaseOf(ctx, t, admin, key)
	w, err := observer.Watch(ctx, "outage")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rec := record(t, w)
	testutil.WaitFor(t, 10*time.Second, "the instance in the watcher", func() bool {
		u, ok := rec.last()
		return ok && !u.Stale && slices.Equal(ids(u), []string{"a"})
	})
	before := len(rec.all())
	srv.Pause()
	time.Sleep(3 * ttl) // the outage being simulated lasts this long
	srv.Resume()
	resumed := len(rec.all())
	testutil.WaitFor(t, 60*time.Second, "the registration registered again, and the watcher fresh with it", func() bool {
		u, ok := rec.last()
		return ok && !u.Stale && slices.Equal(ids(u), []string{"a"}) && reg.Status().State == registry.Registered
	})
	// Whether etcd expired the lease when it resumed, or the registrar
	// renewed it first, depends on which it processed first.
	t.Logf("lease before the pause %x, after %x", lease, leaseOfQuiet(admin, key))
	// Observe for a few TTLs more: the list stays exact.
	time.Sleep(3 * ttl) // the span over which the list must stay exact
	all := rec.all()
	t.Logf("updates (%d before the pause, %d by the resume):\n%s", before, resumed, describe(all))
	if !slices.ContainsFunc(all[before:resumed], func(u registry.Update) bool { return u.Stale }) {
		t.Errorf("the watcher did not turn stale while the server was frozen")
	}
	back := -1
	for i := before; i < len(all); i++ {
		u := all[i]
		if u.Stale {
			continue
		}
		has := slices.Contains(ids(u), "a")
		if has && back < 0 && i >= resumed {
			back = i
		}
		if !has && back >= 0 {
			t.Errorf("update #%d is fresh and lacks the instance, after it came back in #%d", i, back)
		}
	}
	if u, _ := rec.last(); u.Stale || !slices.Equal(ids(u), []string{"a"}) {
		t.Errorf("last update: stale=%v ids=%v; want fresh [a]", u.Stale, ids(u))
	}
	list, err := observer.Lookup(ctx, "outage")
	if err != nil || len(list) != 1 || list[0].ID != "a" {
		t.Errorf("Lookup after the outage: %v, %v", list, err)
	}
	if st := reg.Status(); st.State != registry.Registered {
		t.Errorf("registration after the outage: %+v", st)
	}
}

// TestStoppedLongerThanTTLKeepsTheInstance: etcd is stopped (data kept)
// for three TTLs. On restart it extends every lease by about a TTL, and the
// registrar, whose client gave up renewing during the outage, must renew
// its lease in that time: no watcher update, stale or not, ever lacks the
// instance, and the registration ends Registered.
func TestStoppedLongerThanTTLKeepsTheInstance(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ttl = 2 * time.Second
	registrar, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+"/?ttl="+ttl.String())
	if err != nil {
		t.Fatal(err)
	}
	defer registrar.Close()
	observer := idleRegistry(t, srv.Endpoint(), etcd.Options{TTL: ttl, ProgressInterval: 500 * time.Millisecond, ProgressTimeout: time.Second})
	reg, err := registrar.Register(ctx, registry.Instance{Service: "stopped", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	w, err := observer.Watch(ctx, "stopped")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rec := record(t, w)
	testutil.WaitFor(t, 10*time.Second, "the instance in the watcher", func() bool {
		u, ok := rec.last()
		return ok && !u.Stale && slices.Equal(ids(u), []string{"a"})
	})
	srv.Stop()
	testutil.WaitFor(t, 30*time.Second, "the registration to notice its lease is not renewed", func() bool {
		return reg.Status().State != registry.Registered
	})
	time.Sleep(3 * ttl) // the outage being simulated lasts this long
	srv.Start()
	testutil.WaitFor(t, 60*time.Second, "the registration registered again, and the watcher fresh with it", func() bool {
		u, ok := rec.last()
		return ok && !u.Stale && slices.Equal(ids(u), []string{"a"}) && reg.Status().State == registry.Registered
	})
	time.Sleep(3 * ttl) // the span over which the list must stay exact: the restart extended leases by about this
	all := rec.all()
	t.Logf("updates:\n%s", describe(all))
	for i, u := range all {
		if !slices.Equal(ids(u), []string{"a"}) {
			t.Errorf("update #%d (stale=%v) lists %v: the live instance was shown gone", i, u.Stale, ids(u))
		}
	}
	if st := reg.Status(); st.State != registry.Registered {
		t.Errorf("registration after the outage: %+v", st)
	}
}

func leaseOfQuiet(cli *clientv3.Client, key string) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		return 0
	}
	return resp.Kvs[0].Lease
}
