package static_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/backends/static"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func open(t *testing.T, rawURL string) registry.Registry {
	t.Helper()
	r, err := registry.Open(ctxT(t), rawURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func addrs(list []registry.Instance) []string {
	var s []string
	for _, in := range list {
		s = append(s, in.ID+"@"+in.Addr)
	}
	return s
}

func TestHostListIsEveryServicesEndpoints(t *testing.T) {
	r := open(t, "static://10.0.0.2:8080,10.0.0.1:8080")
	for _, svc := range []string{"user.rpc", "billing"} {
		got, err := r.Lookup(ctxT(t), svc)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"10.0.0.1:8080@10.0.0.1:8080", "10.0.0.2:8080@10.0.0.2:8080"}; !slices.Equal(addrs(got), want) {
			t.Fatalf("Lookup(%s) = %v, want %v", svc, addrs(got), want)
		}
		if got[0].Service != svc {
			t.Fatalf("Lookup(%s) gave an instance of service %q", svc, got[0].Service)
		}
	}
	w, err := r.Watch(ctxT(t), "user.rpc")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u, err := w.Next(ctxT(t))
	if err != nil || u.Stale || !u.Synced || len(u.Added) != 2 {
		t.Fatalf("first update %+v, %v: want both endpoints, synced and fresh", u, err)
	}
	if err := r.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func TestRegisterIsNotSupported(t *testing.T) {
	r := open(t, "static://10.0.0.1:8080")
	_, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", Addr: "10.0.0.9:8080"})
	if !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("Register: %v, want errors.ErrUnsupported saying the registry is read-only", err)
	}
	got, err := r.Lookup(ctxT(t), "user.rpc")
	if err != nil || len(got) != 1 {
		t.Fatalf("Lookup after a refused Register: %v, %v", addrs(got), err)
	}
}

func TestMalformedURLsAreRefused(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "eps.json")
	writeFile(t, good, `{}`)
	for _, raw := range []string{
		"static://",                           // nothing
		"static:///",                          // nothing
		"static://10.0.0.1",                   // no port
		"static://10.0.0.1:8080,",             // an empty endpoint
		"static://u:p@10.0.0.1:8080",          // credentials
		"static://10.0.0.1:8080/svc",          // a path (a gRPC target given as a registry URL)
		"static://10.0.0.1:8080?ttl=5s",       // an unknown parameter
		"static://10.0.0.1:8080?file=" + good, // both
	} {
		r, err := registry.Open(ctxT(t), raw)
		if err == nil {
			_ = r.Close()
			t.Errorf("Open(%q) succeeded", raw)
			continue
		}
		if !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("Open(%q): %v, want registry.ErrInvalidURL", raw, err)
		}
		if strings.Contains(err.Error(), "u:p") || strings.Contains(err.Error(), ":p@") {
			t.Errorf("Open(%q): the error shows the credentials: %v", raw, err)
		}
		t.Logf("%s: %v", raw, err)
	}
}

func TestMissingFileIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.json")
	r, err := registry.Open(ctxT(t), "static:///?file="+path)
	if err == nil {
		_ = r.Close()
		t.Fatal("Open of a missing file succeeded")
	}
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open of a missing file: %v, want an error naming it as missing", err)
	}
}

func TestOptionsInstances(t *testing.T) {
	r, err := static.New(&static.Options{Instances: []registry.Instance{
		{Service: "a", ID: "x", Addr: "[::1]:8080", Metadata: map[string]string{registry.MetaZone: "z1"}},
		{Service: "a", Addr: "127.0.0.1:8081"},
		{Service: "b", ID: "y", Addr: "127.0.0.1:8082"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := r.Lookup(ctxT(t), "a")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.1:8081@127.0.0.1:8081", "x@[::1]:8080"}; !slices.Equal(addrs(got), want) {
		t.Fatalf("Lookup(a) = %v, want %v", addrs(got), want)
	}
	if got[1].Zone() != "z1" {
		t.Fatalf("metadata lost: %+v", got[1])
	}
	if got, _ := r.Lookup(ctxT(t), "none"); len(got) != 0 {
		t.Fatalf("a service with no endpoints has %v", addrs(got))
	}
	for _, bad := range [][]registry.Instance{
		{{Service: "a", Addr: "nohost"}},
		{{Service: "a", ID: "x", Addr: "127.0.0.1:1"}, {Service: "a", ID: "x", Addr: "127.0.0.1:2"}},
	} {
		if r, err := static.New(&static.Options{Instances: bad}); err == nil {
			_ = r.Close()
			t.Errorf("New(%v) succeeded", bad)
		}
	}
	if _, err := static.New(&static.Options{}); err == nil {
		t.Error("New with nothing succeeded")
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	// As editors save: a new file renamed over the old one.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// follow applies every update w delivers to the list they imply, and
// returns a function reporting that list (ID@addr/zone, sorted).
func follow(t *testing.T, w *registry.Watcher) func() []string {
	t.Helper()
	var mu sync.Mutex
	state := map[string]string{}
	go func() {
		for {
			u, err := w.Next(context.Background())
			if err != nil {
				return
			}
			mu.Lock()
			for _, in := range u.Removed {
				delete(state, in.ID)
			}
			for _, in := range slices.Concat(u.Added, u.Changed) {
				state[in.ID] = in.ID + "@" + in.Addr + "/" + in.Zone()
			}
			mu.Unlock()
		}
	}()
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Sorted(maps.Values(state))
	}
}

func TestFileChangesReachWatchersAndBadFilesLoseNothing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "endpoints.json")
	writeFile(t, path, `{"user.rpc": ["10.0.0.1:8080", {"addr": "10.0.0.2:8080", "id": "b", "metadata": {"zone": "z1"}}]}`)
	r := open(t, "static:///?file="+path)
	w, err := r.Watch(ctxT(t), "user.rpc")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	current := follow(t, w)
	want := func(what string, list ...string) {
		t.Helper()
		testutil.WaitFor(t, 10*time.Second, what, func() bool { return slices.Equal(current(), list) })
		got, err := r.Lookup(ctxT(t), "user.rpc")
		if err != nil {
			t.Fatal(err)
		}
		var ls []string
		for _, in := range got {
			ls = append(ls, in.ID+"@"+in.Addr+"/"+in.Zone())
		}
		if !slices.Equal(ls, list) {
			t.Fatalf("%s: Lookup = %v, want %v", what, ls, list)
		}
	}
	want("the first list", "10.0.0.1:8080@10.0.0.1:8080/", "b@10.0.0.2:8080/z1")

	writeFile(t, path, `{"user.rpc": [{"addr": "10.0.0.2:8080", "id": "b", "metadata": {"zone": "z2"}}, "10.0.0.3:8080"]}`)
	want("the edited list", "10.0.0.3:8080@10.0.0.3:8080/", "b@10.0.0.2:8080/z2")

	for _, garbage := range []string{
		`{"user.rpc": [`,                         // cut short while being written
		`{"user.rpc": ["10.0.0.1"]}`,             // an address with no port
		`{"user.rpc": [{"adr": "10.0.0.1:80"}]}`, // a misspelt field
		`["10.0.0.1:80"]`,                        // not an object
	} {
		writeFile(t, path, garbage)
		testutil.WaitFor(t, 10*time.Second, "Ping to report the bad file "+garbage, func() bool {
			err := r.Ping(ctxT(t))
			return errors.Is(err, registry.ErrUnavailable)
		})
		want("the last good list after "+garbage, "10.0.0.3:8080@10.0.0.3:8080/", "b@10.0.0.2:8080/z2")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "Ping to report the removed file", func() bool { return r.Ping(ctxT(t)) != nil })
	want("the last good list after the file was removed", "10.0.0.3:8080@10.0.0.3:8080/", "b@10.0.0.2:8080/z2")

	writeFile(t, path, `{"user.rpc": [], "other": ["10.0.0.9:1"]}`)
	want("the empty list the file now gives")
	testutil.WaitFor(t, 10*time.Second, "Ping to be fine again", func() bool { return r.Ping(ctxT(t)) == nil })
}

// Services lists the file's services that have endpoints; the host-list
// form, where every service has the same endpoints, has no list.
func TestServices(t *testing.T) {
	path := filepath.Join(t.TempDir(), "endpoints.json")
	writeFile(t, path, `{"user.rpc": ["10.0.0.1:8080"], "billing": ["10.0.0.2:8080", "10.0.0.3:8080"], "empty": []}`)
	if got, err := open(t, "static:///?file="+path).Services(ctxT(t)); err != nil || !slices.Equal(got, []string{"billing", "user.rpc"}) {
		t.Fatalf("Services of the file = %q, %v; want [billing user.rpc]", got, err)
	}
	if _, err := open(t, "static://10.0.0.1:8080").Services(ctxT(t)); !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Services of the host list: %v, want errors.ErrUnsupported", err)
	}
}
