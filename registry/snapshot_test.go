package registry_test

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// snapRegistry returns a registry over srv whose Watchers keep snapshots in
// dir, logging into log when it is not nil.
func snapRegistry(t *testing.T, srv *memory.Server, dir string, log *testutil.Buffer) registry.Registry {
	t.Helper()
	o := registry.Options{Snapshot: registry.Snapshot{Dir: dir, Key: "test", Wait: 100 * time.Millisecond},
		Backoff: registry.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}}
	if log != nil {
		o.Logger = slog.New(slog.NewTextHandler(log, nil))
	}
	r := memory.New(srv, &memory.Options{TTL: time.Hour, Registry: o})
	t.Cleanup(func() { r.Close() })
	return r
}

// writeSnapshotOf watches service through a snapshot registry until it lists
// want, and closes it: its snapshot then holds want.
func writeSnapshotOf(t *testing.T, srv *memory.Server, dir, service string, want ...string) {
	t.Helper()
	r := snapRegistry(t, srv, dir, nil)
	w, err := r.Watch(testCtx(t), service)
	if err != nil {
		t.Fatal(err)
	}
	for {
		u, err := w.Next(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if !u.Stale && slices.Equal(ids(u.Instances()), want) {
			break
		}
	}
	r.Close()
}

func snapshotFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "rollcall-*.json"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// firstUpdate returns the first update of a new watch of service through r
// that is synced or served from a snapshot, skipping a stale one before it
// (the watch failed before the snapshot was served).
func firstUpdate(t *testing.T, r registry.Registry, service string) registry.Update {
	t.Helper()
	w := newWatch(t, r, service)
	for {
		u, err := w.Next(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if u.Synced || !u.Snapshot.IsZero() {
			return u
		}
	}
}

func newWatch(t *testing.T, r registry.Registry, service string) *registry.Watcher {
	t.Helper()
	w, err := r.Watch(testCtx(t), service)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// A Watcher that starts with the server down serves the snapshot, stale,
// with its time; when the server is back it delivers the registry's list,
// removals included at once (no resync grace: nothing said the snapshot's
// instances were alive).
func TestSnapshotServedWhileServerDownThenReplaced(t *testing.T) {
	srv := memory.NewServer()
	dir := t.TempDir()
	r0 := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { r0.Close() })
	a, err := r0.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r0.Register(testCtx(t), registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"}); err != nil {
		t.Fatal(err)
	}
	writeSnapshotOf(t, srv, dir, "s", "a", "b")
	if n := len(snapshotFiles(t, dir)); n != 1 {
		t.Fatalf("%d snapshot files, want 1", n)
	}
	if err := a.Deregister(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	t.Cleanup(srv.Start) // before r0 closes
	start := time.Now()
	r := snapRegistry(t, srv, dir, nil)
	w, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var u registry.Update
	for u.Snapshot.IsZero() {
		if u, err = w.Next(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		if !u.Snapshot.IsZero() || u.Stale && !u.Synced {
			continue
		}
		t.Fatalf("update %v before the snapshot while the server is stopped", &u)
	}
	if !u.Stale || !u.Synced || !slices.Equal(ids(u.Instances()), []string{"a", "b"}) || !errors.Is(u.Err, registry.ErrUnavailable) {
		t.Fatalf("snapshot update %v %v, want stale, synced, [a b], ErrUnavailable", &u, ids(u.Instances()))
	}
	if age := time.Since(u.Snapshot); age < 0 || age > time.Since(start)+time.Minute {
		t.Fatalf("snapshot time %v is not when it was written", u.Snapshot)
	}
	srv.Start()
	for {
		if u, err = w.Next(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		if !u.Stale {
			break
		}
	}
	if !u.Snapshot.IsZero() || !slices.Equal(ids(u.Instances()), []string{"b"}) || !slices.Equal(ids(u.Removed), []string{"a"}) {
		t.Fatalf("first fresh update %v: %v, removed %v; want [b], a removed, no snapshot", &u, ids(u.Instances()), ids(u.Removed))
	}
}

// With the server up the snapshot is never served: the first update is the
// registry's.
func TestSnapshotNotServedWhenServerAnswers(t *testing.T) {
	srv := memory.NewServer()
	dir := t.TempDir()
	r0 := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { r0.Close() })
	reg, err := r0.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	writeSnapshotOf(t, srv, dir, "s", "a")
	if err := reg.Deregister(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	u := firstUpdate(t, snapRegistry(t, srv, dir, nil), "s")
	if u.Stale || !u.Snapshot.IsZero() || len(u.Instances()) != 0 {
		t.Fatalf("first update %v %v, want the registry's empty list", &u, ids(u.Instances()))
	}
}

// A snapshot that is corrupt, too old, of another version or written for
// another registry is ignored with a log line: the Watcher is stale with
// nothing known, as without snapshots.
func TestSnapshotIgnoredWhenUnusable(t *testing.T) {
	srv := memory.NewServer()
	dir := t.TempDir()
	r0 := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { r0.Close() })
	if _, err := r0.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	writeSnapshotOf(t, srv, dir, "s", "a")
	files := snapshotFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("%d snapshot files, want 1", len(files))
	}
	good, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	t.Cleanup(srv.Start) // before r0 closes
	for _, c := range []struct{ name, content, log string }{
		{"corrupt", `{"version":1,"instances":[`, "not a snapshot"},
		{"old", strings.Replace(string(good), `"written":"`+time.Now().UTC().Format("2006-01-02"), `"written":"2001-01-01`, 1), "ago, more than"},
		{"version", strings.Replace(string(good), `"version":1`, `"version":99`, 1), "version 99"},
		{"foreign", strings.Replace(string(good), `"registry":"test"`, `"registry":"other"`, 1), "written for service"},
		{"garbage instance", strings.Replace(string(good), `"addr":"127.0.0.1:1"`, `"addr":"nowhere"`, 1), ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.content == string(good) {
				t.Fatal("the test's edit did not apply")
			}
			if err := os.WriteFile(files[0], []byte(c.content), 0o600); err != nil {
				t.Fatal(err)
			}
			var log testutil.Buffer
			r := snapRegistry(t, srv, dir, &log)
			if c.log == "" {
				// Valid file, invalid instance: skipped as a registry's would be.
				u := firstUpdate(t, r, "s")
				if u.Snapshot.IsZero() || len(u.Instances()) != 0 {
					t.Fatalf("update %v %v, want the snapshot without its invalid instance", &u, ids(u.Instances()))
				}
				return
			}
			w := newWatch(t, r, "s")
			// The snapshot is read, and ignored, before it could be served.
			testutil.WaitFor(t, 10*time.Second, "the log line saying the snapshot is ignored", func() bool {
				return strings.Contains(log.String(), "ignoring the snapshot")
			})
			if !strings.Contains(log.String(), c.log) {
				t.Fatalf("log does not say why the snapshot was ignored (%q):\n%s", c.log, log.String())
			}
			u, err := w.Next(testCtx(t))
			if err != nil {
				t.Fatal(err)
			}
			if !u.Snapshot.IsZero() || u.Synced || !u.Stale {
				t.Fatalf("update %v, want stale with nothing known", &u)
			}
		})
	}
}

// Snapshot parameters in a URL work with every scheme; bad ones are
// ErrInvalidURL.
func TestOpenTakesSnapshotParameters(t *testing.T) {
	dir := t.TempDir()
	r, err := registry.Open(testCtx(t), "mem://snapurl?ttl=1h&snapshot="+dir+"&snapshot_wait=50ms&snapshot_max_age=1h")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	w, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Next(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	w.Close()
	files := snapshotFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("%d snapshot files after a watch, want 1", len(files))
	}
	data, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(`"registry":"mem://snapurl?ttl=1h"`)) || bytes.Contains(data, []byte(dir)) {
		t.Fatalf("snapshot not keyed by the URL without its snapshot parameters: %s", data)
	}
	for _, bad := range []string{
		"mem://snapurl?snapshot_wait=1s",
		"mem://snapurl?snapshot=" + dir + "&snapshot_wait=banana",
		"mem://snapurl?snapshot=" + dir + "&snapshot_max_age=-1h",
		"mem://snapurl?snapshot=" + dir + "&snapshot=" + dir,
	} {
		if r, err := registry.Open(testCtx(t), bad); !errors.Is(err, registry.ErrInvalidURL) {
			if err == nil {
				r.Close()
			}
			t.Errorf("Open(%q) = %v, want ErrInvalidURL", bad, err)
		}
	}
}
