package nacos_test

import (
	"context"
	"errors"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/registry"
)

// After a reconnect, nacos-sdk-go v2.3.5 applies two kinds of news about a
// subscribed service on two goroutines: the answer to its re-subscribe (its
// redo, on the connection-event goroutine) and the server's pushes (on the
// stream goroutine). Each stores the list in the SDK's cache, writes it to
// disk, then calls the callbacks, so the callbacks of the two can arrive in
// either order, the older list last. This test makes that order happen
// deterministically (a callback registered before the backend's holds the
// redo's callback until the push was applied) and checks that the backend
// ends with the newest list, not the last callback's.
func TestWatchKeepsNewestListWhenSDKCallbacksCross(t *testing.T) {
	if runWithoutRace(t, "^"+regexp.QuoteMeta(t.Name())+"$") {
		return
	}
	srv := nacosserver.Start(t)
	srv.SetPushDelay(0)
	inst := model.Instance{Ip: "10.0.0.1", Port: 80, Weight: 1, Enable: true, Healthy: true, Ephemeral: true,
		Metadata: map[string]string{nacos.MetaID: "a"}}
	srv.Inject("", "", "svc", inst)
	cli := newClient(t, srv, nacos.ClientOptions{Timeout: 2 * time.Second})

	var (
		mu      sync.Mutex
		armed   bool
		held    = make(chan struct{})
		release = make(chan struct{})
		passed  = make(chan struct{})
	)
	gate := func(hosts []model.Instance, err error) {
		mu.Lock()
		hold := armed && len(hosts) == 0 && fromRedo()
		if hold {
			armed = false
		}
		mu.Unlock()
		if hold {
			close(held)
			<-release
			close(passed)
		}
	}
	// Registered first, so the SDK calls it before the backend's callback.
	if err := cli.Subscribe(&vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: gate}); err != nil {
		t.Fatal(err)
	}
	r := newRegistry(t, cli, &nacos.Options{TTL: time.Minute})
	ids := watchIDs(t, r, "svc")
	waitFor(t, 20*time.Second, "the watcher to show a", func() bool { got, _ := ids(); return slices.Equal(got, []string{"a"}) })

	// The server restarts without the instance; its pushes wait a while, so
	// that the redo's answer (an empty list) is applied first.
	srv.SetPushDelay(time.Second)
	mu.Lock()
	armed = true
	mu.Unlock()
	srv.Stop()
	srv.RemoveInjected("", "", "svc", "10.0.0.1", 80)
	srv.Start()
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the SDK's redo never called back with the empty list")
	}
	// The instance is back; its push is applied (and acknowledged) while
	// the redo's callback is held.
	srv.Inject("", "", "svc", inst)
	waitFor(t, 20*time.Second, "the push of a to be acknowledged", func() bool {
		return srv.PendingPushes("", "", "svc") == 0
	})
	close(release)
	<-passed

	// The redo's stale empty list reached the backend last; the server and
	// the SDK's cache hold a.
	cached, err := cli.GetService(vo.GetServiceParam{ServiceName: "svc"})
	if err != nil || len(cached.Hosts) != 1 {
		t.Fatalf("the SDK's cache holds %v (%v)", cached.Hosts, err)
	}
	list, err := r.Lookup(ctxT(t), "svc")
	if err != nil || len(list) != 1 || list[0].ID != "a" {
		t.Fatalf("Lookup after the crossed callbacks = %v, %v; want [a]", list, err)
	}
	waitFor(t, 20*time.Second, "the watcher to show a", func() bool { got, _ := ids(); return slices.Equal(got, []string{"a"}) })
}

// fromRedo reports whether the caller runs in the SDK's redo of its
// subscriptions.
func fromRedo() bool {
	buf := make([]byte, 64<<10)
	return strings.Contains(string(buf[:runtime.Stack(buf, false)]), "redoSubscribe")
}

// Against a frozen server, the SDK waits for its own request timeout (here
// 30s); every call of the backend returns when its ctx ends instead (the
// shared layer gives each call CallTimeout, here 1s, and reports the
// timeout as ErrUnavailable).
func TestCallsReturnWithTheirCtxWhileServerPaused(t *testing.T) {
	if runWithoutRace(t, "^"+regexp.QuoteMeta(t.Name())+"$") {
		return
	}
	srv := startServer(t)
	cli := newClient(t, srv, nacos.ClientOptions{Timeout: 30 * time.Second})
	r := newRegistry(t, cli, &nacos.Options{TTL: time.Minute, Registry: registry.Options{CallTimeout: time.Second}})
	reg, err := r.Register(ctxT(t), registry.Instance{Service: "svc", ID: "a", Addr: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	defer srv.Resume()
	calls := map[string]func(ctx context.Context) error{
		"Register": func(ctx context.Context) error {
			_, err := r.Register(ctx, registry.Instance{Service: "other", ID: "b", Addr: "10.0.0.2:80"})
			return err
		},
		"Lookup": func(ctx context.Context) error { _, err := r.Lookup(ctx, "third"); return err },
		"Update": func(ctx context.Context) error {
			return reg.Update(ctx, registry.Instance{Service: "svc", ID: "a", Addr: "10.0.0.1:80", Metadata: map[string]string{"v": "2"}})
		},
		"Ping": r.Ping,
	}
	for name, call := range calls {
		res := make(chan error, 1)
		go func() { res <- call(context.Background()) }()
		select {
		case err := <-res:
			if err == nil {
				t.Fatalf("%s on a paused server succeeded", name)
			}
			if !errors.Is(err, registry.ErrUnavailable) {
				t.Fatalf("%s on a paused server: %v, want registry.ErrUnavailable", name, err)
			}
			t.Logf("%s: %v", name, err)
		case <-time.After(15 * time.Second):
			t.Fatalf("%s still blocked 15s after its 1s CallTimeout (the SDK's timeout is 30s)", name)
		}
	}
}
