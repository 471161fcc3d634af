package registry_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestValidate(t *testing.T) {
	ok := []registry.Instance{
		{Service: "user.rpc", Addr: "10.0.0.7:8080"},
		{Service: "user_rpc-v2:grpc", ID: "i-1", Addr: "[::1]:80"},
		{Service: "a", Addr: "host.example.com:65535", Metadata: map[string]string{"weight": "10000", "zone": "eu 1"}},
	}
	for _, in := range ok {
		if err := in.Validate(); err != nil {
			t.Errorf("Validate(%v) = %v, want nil", in, err)
		}
	}
	bad := map[string]registry.Instance{
		"empty service":      {Addr: "1.2.3.4:1"},
		"slash":              {Service: "a/b", Addr: "1.2.3.4:1"},
		"control":            {Service: "a\nb", Addr: "1.2.3.4:1"},
		"dot":                {Service: "..", Addr: "1.2.3.4:1"},
		"leading dash":       {Service: "-a", Addr: "1.2.3.4:1"},
		"long":               {Service: strings.Repeat("a", 129), Addr: "1.2.3.4:1"},
		"no port":            {Service: "a", Addr: "1.2.3.4"},
		"port 0":             {Service: "a", Addr: "1.2.3.4:0"},
		"bad host":           {Service: "a", Addr: "bad host:80"},
		"id slash":           {Service: "a", ID: "x/y", Addr: "1.2.3.4:1"},
		"weight zero":        {Service: "a", Addr: "1.2.3.4:1", Metadata: map[string]string{"weight": "0"}},
		"weight text":        {Service: "a", Addr: "1.2.3.4:1", Metadata: map[string]string{"weight": "heavy"}},
		"meta key =":         {Service: "a", Addr: "1.2.3.4:1", Metadata: map[string]string{"a=b": "c"}},
		"meta value control": {Service: "a", Addr: "1.2.3.4:1", Metadata: map[string]string{"a": "b\x00"}},
		"meta too big":       {Service: "a", Addr: "1.2.3.4:1", Metadata: map[string]string{"a": strings.Repeat("b", 17000)}},
		"address as id bad":  {Service: "a", Addr: "[fe80::1%eth0]:80"},
	}
	for name, in := range bad {
		err := in.Validate()
		if !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("%s: Validate = %v, want ErrInvalidInstance", name, err)
		}
	}
	many := map[string]string{}
	for i := range 65 {
		many[strings.Repeat("k", i+1)] = "v"
	}
	if err := (registry.Instance{Service: "a", Addr: "1.2.3.4:1", Metadata: many}).Validate(); err == nil {
		t.Error("65 metadata keys accepted")
	}
}

func TestInstanceAccessors(t *testing.T) {
	in := registry.Instance{Service: "s", Addr: "1.2.3.4:5", Metadata: map[string]string{"weight": "7", "zone": "z", "version": "v"}}
	if in.Weight() != 7 || in.Zone() != "z" || in.Version() != "v" || in.Key() != "1.2.3.4:5" {
		t.Fatalf("accessors: %d %q %q %q", in.Weight(), in.Zone(), in.Version(), in.Key())
	}
	if (registry.Instance{}).Weight() != 1 {
		t.Fatal("default weight is not 1")
	}
	c := in.Clone()
	c.Metadata["zone"] = "other"
	if in.Zone() != "z" {
		t.Fatal("Clone shares metadata")
	}
}

type nopOpener struct{}

func (nopOpener) OpenRegistryURL(context.Context, *url.URL) (registry.Registry, error) {
	return nil, errors.New("nop")
}

func TestURLMux(t *testing.T) {
	var m registry.URLMux // the zero value works
	m.Register("b", nopOpener{})
	m.Register("a", nopOpener{})
	if got := m.Schemes(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("Schemes = %v", got)
	}
	if !m.ValidScheme("a") || m.ValidScheme("c") {
		t.Fatal("ValidScheme")
	}
	for _, s := range []string{"", "A", "a", "1x", "a b"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Register(%q) did not panic", s)
				}
			}()
			m.Register(s, nopOpener{})
		}()
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Register with nil opener did not panic")
			}
		}()
		m.Register("z", nil)
	}()
	_, err := m.Open(context.Background(), "etcd://h:2379")
	if !errors.Is(err, registry.ErrUnknownScheme) || !strings.Contains(err.Error(), "forgotten import?") {
		t.Fatalf("unknown scheme error = %v", err)
	}
	for _, raw := range []string{"::nope", "no-scheme", "http://user:s3cret@[::1"} {
		_, err := m.Open(context.Background(), raw)
		if !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("Open(%q) = %v, want ErrInvalidURL", raw, err)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("error reveals the password: %v", err)
		}
	}
	if !slices.Contains(registry.DefaultURLMux().Schemes(), "mem") {
		t.Fatal("mem scheme not registered by the memory backend's init")
	}
}

func TestRedact(t *testing.T) {
	for in, want := range map[string]string{
		"etcd://root:s3cret@h:2379/p?ttl=1s":        "etcd://root:xxxxx@h:2379/p?ttl=1s",
		"consul://h:8500/?token=abc&dc=x":           "consul://h:8500/?dc=x&token=xxxxx",
		"etcd://h:2379":                             "etcd://h:2379",
		"nacos://u:p@h:8848/?password=p&namespace=": "nacos://u:xxxxx@h:8848/?namespace=&password=xxxxx",
	} {
		if got := registry.Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
	if got := registry.Redact("etcd://u:s3cret@[::1"); strings.Contains(got, "s3cret") {
		t.Errorf("unparsable URL redacted to %q", got)
	}
}

func TestURLParams(t *testing.T) {
	u, _ := url.Parse("x://h/?ttl=5s&tls=true&name=n")
	p := registry.NewURLParams(u)
	if p.Duration("ttl", 0) != 5*time.Second || !p.Bool("tls", false) || p.String("name", "") != "n" || p.String("absent", "d") != "d" {
		t.Fatal("values")
	}
	if err := p.Err(); err != nil {
		t.Fatal(err)
	}
	for _, raw := range []string{"x://h/?ttl=5", "x://h/?ttl=-1s", "x://h/?tls=maybe", "x://h/?extra=1", "x://h/?ttl=1s&ttl=2s"} {
		u, _ := url.Parse(raw)
		p := registry.NewURLParams(u)
		p.Duration("ttl", time.Second)
		p.Bool("tls", false)
		if err := p.Err(); !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("%s: Err = %v, want ErrInvalidURL", raw, err)
		}
	}
}

func TestBackoff(t *testing.T) {
	b := registry.Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	for attempt := range 40 {
		d := b.Delay(attempt)
		want := min(time.Second, 100*time.Millisecond<<min(attempt, 20))
		if d < want/2 || d > want {
			t.Fatalf("Delay(%d) = %v, want in [%v, %v]", attempt, d, want/2, want)
		}
	}
}

// TestWatcherFreezesAndResyncsWithOneDiff checks the shared layer directly:
// while the server is stopped the list stays, and on return only the
// difference is delivered.
func TestWatcherFreezesAndResyncsWithOneDiff(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := memory.NewServer()
	r := memory.New(srv, &memory.Options{TTL: time.Hour, Registry: registry.Options{Backoff: registry.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}}})
	defer r.Close()
	other := memory.New(srv, &memory.Options{TTL: time.Hour, Registry: registry.Options{ResyncGrace: 100 * time.Millisecond}})
	defer other.Close()
	for _, id := range []string{"a", "b"} {
		if _, err := r.Register(ctx, registry.Instance{Service: "s", ID: id, Addr: "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
	}
	srv.Put(driver.Instance{Service: "s", ID: "c", Addr: "127.0.0.1:3"}) // written by another tool, no lease
	w, err := other.Watch(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u, err := w.Next(ctx)
	if err != nil || len(u.Instances()) != 3 || len(u.Added) != 3 || u.Stale || !u.Synced {
		t.Fatalf("first update %+v, %v", u, err)
	}
	srv.Stop()
	u, err = w.Next(ctx)
	if err != nil || !u.Stale || u.Err == nil || len(u.Instances()) != 3 || len(u.Removed) != 0 {
		t.Fatalf("stale update %+v, %v: want stale with the 3 instances kept", u, err)
	}
	// While down, "c" goes away and "d" arrives behind the watcher's back.
	srv.Delete("s", "c")
	srv.Put(driver.Instance{Service: "s", ID: "d", Addr: "127.0.0.1:2"})
	srv.Start()
	u, err = w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// "c" is held back while the watcher stays stale for the resync grace
	// (its registrar might be re-registering it this very moment)...
	if !u.Stale || !slices.Equal(ids(u.Added), []string{"d"}) || len(u.Removed) != 0 ||
		!slices.Equal(ids(u.Instances()), []string{"a", "b", "c", "d"}) {
		t.Fatalf("resync update: stale=%v added=%v removed=%v all=%v", u.Stale, ids(u.Added), ids(u.Removed), ids(u.Instances()))
	}
	// ... and removed when the grace ends.
	u, err = w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if u.Stale || len(u.Added) != 0 || !slices.Equal(ids(u.Removed), []string{"c"}) ||
		!slices.Equal(ids(u.Instances()), []string{"a", "b", "d"}) {
		t.Fatalf("resync update: stale=%v added=%v removed=%v all=%v", u.Stale, ids(u.Added), ids(u.Removed), ids(u.Instances()))
	}
}

// TestUpdateSnapshotsAreStable: an update's Instances() does not change when
// later updates arrive.
func TestUpdateSnapshotsAreStable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := memory.NewServer()
	r := memory.New(srv, nil)
	defer r.Close()
	w, err := r.Watch(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var kept []registry.Update
	for i := range 300 {
		if _, err := r.Register(ctx, registry.Instance{Service: "s", ID: fmt.Sprintf("i%03d", i), Addr: "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, u)
	}
	seen := 0
	for _, u := range kept {
		n := len(u.Instances())
		if n < seen {
			t.Fatalf("snapshot shrank from %d to %d", seen, n)
		}
		seen = n
	}
	if seen != 300 {
		t.Fatalf("last snapshot has %d instances", seen)
	}
	// The first kept update still shows what it showed.
	if n := len(kept[0].Instances()); n > 1 {
		t.Fatalf("first update now shows %d instances", n)
	}
}

// Services lists the services that have instances, sorted, each once; a
// backend that cannot list services says so with errors.ErrUnsupported.
func TestServices(t *testing.T) {
	ctx := testCtx(t)
	r := memory.New(memory.NewServer(), nil)
	defer r.Close()
	for _, in := range []registry.Instance{{Service: "b", ID: "1", Addr: "127.0.0.1:1"}, {Service: "a", ID: "1", Addr: "127.0.0.1:1"}, {Service: "b", ID: "2", Addr: "127.0.0.1:2"}} {
		if _, err := r.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := r.Services(ctx); err != nil || !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("Services = %q, %v; want [a b]", got, err)
	}
	bare := registry.New(listOnly{}, nil)
	defer bare.Close()
	var re *registry.Error
	if _, err := bare.Services(ctx); !errors.Is(err, errors.ErrUnsupported) || !errors.As(err, &re) || re.Op != "services" {
		t.Errorf("Services of a backend without ServiceLister: %v, want an Error wrapping errors.ErrUnsupported", err)
	}
	r.Close()
	if _, err := r.Services(ctx); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Services after Close: %v, want ErrClosed", err)
	}
}

// listOnly is a backend with no optional capability.
type listOnly struct{}

func (listOnly) Publish(context.Context, driver.Instance) (driver.Publication, error) {
	return nil, errors.ErrUnsupported
}
func (listOnly) List(context.Context, string) ([]driver.Instance, error) { return nil, nil }
func (listOnly) Watch(context.Context, string) (driver.Stream, error) {
	return nil, errors.ErrUnsupported
}
func (listOnly) Close() error { return nil }
