package nacos_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

func startServer(t *testing.T) *nacosserver.Server {
	srv := nacosserver.Start(t)
	srv.SetPushDelay(testPushDelay)
	return srv
}

func newClient(t *testing.T, srv *nacosserver.Server, opts nacos.ClientOptions) *nacos.Client {
	t.Helper()
	opts.Servers = []string{srv.Addr()}
	if opts.CacheDir == "" {
		opts.CacheDir = testutil.TempDir(t)
	}
	cli, err := nacos.NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cli.CloseClient)
	return cli
}

func newRegistry(t *testing.T, cli naming_client.INamingClient, opts *nacos.Options) registry.Registry {
	t.Helper()
	r, err := nacos.New(cli, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

var waitFor = testutil.WaitFor

// counted counts the registrations the backend sends through it; the SDK's
// own redo does not go through it.
type counted struct {
	*nacos.Client
	registers atomic.Int64
}

func (c *counted) RegisterInstance(p vo.RegisterInstanceParam) (bool, error) {
	c.registers.Add(1)
	return c.Client.RegisterInstance(p)
}

func (c *counted) BatchRegisterInstance(p vo.BatchRegisterInstanceParam) (bool, error) {
	c.registers.Add(1)
	return c.Client.BatchRegisterInstance(p)
}

func (c *counted) Unwrap() naming_client.INamingClient { return c.Client }

// watchIDs follows a service and returns a function reporting the latest
// IDs and stale flag.
func watchIDs(t *testing.T, r registry.Registry, service string) func() ([]string, bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ids []string
	var stale bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			var cur []string
			for _, in := range u.Instances() {
				cur = append(cur, in.ID)
			}
			mu.Lock()
			ids, stale = cur, u.Stale
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); w.Close(); <-done })
	return func() ([]string, bool) {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(ids), stale
	}
}

// After the server restarts with no data, the SDK reconnects and its redo
// registers the instance again; the backend reports the registration lost
// (so the supervisor counts a re-registration) but sends nothing itself, and
// the server holds the instance once.
func TestRestartWithWipedDataRegistersOnce(t *testing.T) {
	if runWithoutRace(t, "^"+regexp.QuoteMeta(t.Name())+"$") {
		return
	}
	srv := startServer(t)
	c := &counted{Client: newClient(t, srv, nacos.ClientOptions{Timeout: 3 * time.Second})}
	r := newRegistry(t, c, &nacos.Options{TTL: 2 * time.Second})
	svc := "wiped-once"
	reg, err := r.Register(ctxT(t), registry.Instance{Service: svc, ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	ids := watchIDs(t, newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), nil), svc)
	waitFor(t, 10*time.Second, "the watcher to see a", func() bool { got, _ := ids(); return slices.Equal(got, []string{"a"}) })
	before := c.registers.Load()

	srv.Restart(true)
	waitFor(t, 30*time.Second, "the registration to come back", func() bool {
		s := reg.Status()
		return s.State == registry.Registered && s.Reregistrations >= 1 && len(srv.Instances("", "", svc)) == 1
	})
	waitFor(t, 10*time.Second, "the watcher to see a, not stale", func() bool {
		got, stale := ids()
		return slices.Equal(got, []string{"a"}) && !stale
	})
	if n := c.registers.Load() - before; n != 0 {
		t.Errorf("the backend sent %d registrations after the restart; the SDK's redo had sent it", n)
	}
	insts := srv.Instances("", "", svc)
	if len(insts) != 1 || insts[0].Metadata[nacos.MetaID] != "a" || insts[0].Port != 9001 {
		t.Fatalf("server holds %+v, want a once", insts)
	}
	if s := reg.Status(); s.Reregistrations != 1 {
		t.Errorf("status %+v, want exactly one re-registration", s)
	}
}

// A paused server makes watchers stale within a few seconds (the probe
// fails after 3 s) and Lookup fail; on resume the list is back, not stale.
func TestPausedServerMakesWatchersStale(t *testing.T) {
	if runWithoutRace(t, "^"+regexp.QuoteMeta(t.Name())+"$") {
		return
	}
	srv := startServer(t)
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{Timeout: 3 * time.Second}), &nacos.Options{TTL: 10 * time.Second})
	svc := "paused"
	if _, err := r.Register(ctxT(t), registry.Instance{Service: svc, ID: "a", Addr: "127.0.0.1:9001"}); err != nil {
		t.Fatal(err)
	}
	ids := watchIDs(t, r, svc)
	waitFor(t, 10*time.Second, "the watcher to see a", func() bool { got, _ := ids(); return slices.Equal(got, []string{"a"}) })
	srv.Pause()
	start := time.Now()
	waitFor(t, 15*time.Second, "the watcher to turn stale", func() bool { _, stale := ids(); return stale })
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("the watcher turned stale %v after the pause, want about 3-4 s", d)
	}
	if got, _ := ids(); !slices.Equal(got, []string{"a"}) {
		t.Errorf("stale list = %v, want [a]", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, err := r.Lookup(ctx, svc)
	cancel()
	if err == nil {
		t.Errorf("Lookup succeeded while the server was paused")
	}
	srv.Resume()
	waitFor(t, 30*time.Second, "the watcher to resync", func() bool {
		got, stale := ids()
		return slices.Equal(got, []string{"a"}) && !stale
	})
}

// Instances of other Nacos clients: those Nacos would not route to are left
// out, the address is the ID, the Nacos weight becomes the weight; a
// cluster option keeps only that cluster.
func TestForeignInstances(t *testing.T) {
	srv := startServer(t)
	svc := "foreign"
	inject := func(ip string, weight float64, enabled, healthy bool, cluster string, md map[string]string) {
		srv.Inject("", "", svc, model.Instance{Ip: ip, Port: 80, Weight: weight, Enable: enabled, Healthy: healthy,
			ClusterName: cluster, Ephemeral: true, Metadata: md})
	}
	inject("10.0.0.1", 2.6, true, true, "", map[string]string{"zone": "z1"})
	inject("10.0.0.2", 1, true, true, "other", nil)
	inject("10.0.0.3", 1, false, true, "", nil) // disabled
	inject("10.0.0.4", 1, true, false, "", nil) // unhealthy
	inject("10.0.0.5", 0, true, true, "", nil)  // weight 0

	cli := newClient(t, srv, nacos.ClientOptions{})
	got, err := newRegistry(t, cli, nil).Lookup(ctxT(t), svc)
	if err != nil {
		t.Fatal(err)
	}
	want := []registry.Instance{
		{Service: svc, ID: "10.0.0.1:80", Addr: "10.0.0.1:80", Metadata: map[string]string{"zone": "z1", registry.MetaWeight: "3"}},
		{Service: svc, ID: "10.0.0.2:80", Addr: "10.0.0.2:80"},
	}
	if !slices.EqualFunc(got, want, registry.Instance.Equal) {
		t.Fatalf("Lookup = %v, want %v", got, want)
	}

	other := newRegistry(t, cli, &nacos.Options{Cluster: "other"})
	got, err = other.Lookup(ctxT(t), svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].ID != "10.0.0.2:80" {
		t.Fatalf("Lookup in cluster other = %v", got)
	}
	if _, err := other.Register(ctxT(t), registry.Instance{Service: svc, ID: "mine", Addr: "10.0.0.9:80",
		Metadata: map[string]string{registry.MetaWeight: "5"}}); err != nil {
		t.Fatal(err)
	}
	for _, in := range srv.Instances("", "", svc) {
		if in.Metadata[nacos.MetaID] == "mine" {
			if in.ClusterName != "other" || in.Weight != 5 || !in.Enable || !in.Healthy || !in.Ephemeral {
				t.Fatalf("registered as %+v", in)
			}
			return
		}
	}
	t.Fatalf("registered instance not on the server: %+v", srv.Instances("", "", svc))
}

// Watchers and Lookups of one service share one SDK subscription, which goes
// once they are done.
func TestOneSubscriptionPerService(t *testing.T) {
	srv := startServer(t)
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), nil)
	svc := "shared"
	ctx := ctxT(t)
	var ws []*registry.Watcher
	for range 3 {
		w, err := r.Watch(ctx, svc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Next(ctx); err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	if _, err := r.Lookup(ctx, svc); err != nil {
		t.Fatal(err)
	}
	if n := srv.Subscribers("", "", svc); n != 1 {
		t.Fatalf("%d connections subscribed, want 1", n)
	}
	for _, w := range ws {
		w.Close()
	}
	waitFor(t, 15*time.Second, "the subscription to go", func() bool { return srv.Subscribers("", "", svc) == 0 })
}

// The SDK's log lines reach the slog logger, without the password, and the
// SDK writes no log file.
func TestSDKLogsGoToSlog(t *testing.T) {
	srv := startServer(t)
	var buf testutil.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	const password = "hunter22-secret"
	dir := testutil.TempDir(t)
	cli := newClient(t, srv, nacos.ClientOptions{Username: "nacos", Password: password, CacheDir: dir, Logger: l})
	r := newRegistry(t, cli, &nacos.Options{Logger: l})
	reg, err := r.Register(ctxT(t), registry.Instance{Service: "logged", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	r.Close()
	cli.CloseClient()
	out := buf.String()
	if !strings.Contains(out, "component=nacos-sdk") {
		t.Errorf("no SDK log line reached slog:\n%s", out)
	}
	if strings.Contains(out, password) {
		t.Errorf("the password reached the log:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, "log")); err == nil {
		t.Errorf("the SDK created its log directory")
	}
}

// Open puts the SDK's cache under the user cache directory (TestMain points
// it at a temporary directory), not the working directory.
func TestOpenUsesUserCacheDir(t *testing.T) {
	srv := startServer(t)
	r, err := registry.Open(ctxT(t), "nacos://"+srv.Addr()+"/?group=cachetest&timeout=3s")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Ping(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(ctxT(t), registry.Instance{Service: "cached", Addr: "127.0.0.1:9001"}); err != nil {
		t.Fatal(err)
	}
	base, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(base, "rollcall", "nacos", "cache", "naming", "public", "cachetest@@cached")
	waitFor(t, 10*time.Second, file, func() bool { _, err := os.Stat(file); return err == nil })
	for _, d := range []string{"cache", "log"} {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("the SDK created %q in the working directory", d)
		}
	}
}

// A registration lost because the server stopped answering (ttl) and then
// deregistered while it is being retried is gone once the server is back:
// neither the backend nor the SDK's redo brings it back.
func TestDeregisterWhileRetrying(t *testing.T) {
	if runWithoutRace(t, "^"+regexp.QuoteMeta(t.Name())+"$") {
		return
	}
	srv := startServer(t)
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{Timeout: 2 * time.Second}), &nacos.Options{TTL: 2 * time.Second})
	svc := "retrying"
	reg, err := r.Register(ctxT(t), registry.Instance{Service: svc, ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	waitFor(t, 15*time.Second, "the registration to be reported lost", func() bool { return reg.Status().State == registry.Retrying })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_ = reg.Deregister(ctx) // fails: the server is paused
	cancel()
	srv.Resume()
	waitFor(t, 30*time.Second, "the instance to be withdrawn", func() bool { return len(srv.Instances("", "", svc)) == 0 })
	// And it stays withdrawn: the SDK reconnected and ran its redo.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if n := len(srv.Instances("", "", svc)); n != 0 {
			t.Fatalf("the instance came back: %+v", srv.Instances("", "", svc))
		}
		time.Sleep(50 * time.Millisecond) // observation interval
	}
}
