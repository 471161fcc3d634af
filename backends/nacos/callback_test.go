package nacos_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
)

// subscribeCounter counts the SDK subscribes the backend makes.
type subscribeCounter struct {
	naming_client.INamingClient
	n atomic.Int32
}

func (c *subscribeCounter) Subscribe(p *vo.SubscribeParam) error {
	c.n.Add(1)
	return c.INamingClient.Subscribe(p)
}

func (c *subscribeCounter) Unwrap() naming_client.INamingClient { return c.INamingClient }

// Issue 11 item 6: the SDK appends a callback before its subscribe request
// and keeps it when the request fails. A watcher opened while the server
// is down tries a subscribe again and again; once the server is back and a watch is open, the
// SDK must hold exactly one callback for the service (not one per failed
// try, each converting every push), none while nothing uses it, and the
// server no subscriber once the watch is closed.
func TestFailedSubscribesLeaveNoCallback(t *testing.T) {
	if runWithoutRace(t, "^TestFailedSubscribesLeaveNoCallback$") {
		return // stopping the server makes the SDK race (see child_test.go)
	}
	srv := nacosserver.Start(t)
	cli, err := nacos.NewClient(nacos.ClientOptions{Servers: []string{srv.Addr()}, CacheDir: testutil.TempDir(t), Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.CloseClient()
	counted := &subscribeCounter{INamingClient: cli}
	r, err := nacos.New(counted, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const svc = "leaky"
	srv.Stop()
	// A watcher opened now retries its subscribe (the shared layer's
	// backoff) until the server is back.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w, err := r.Watch(ctx, svc)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	const tries = 4
	testutil.WaitFor(t, time.Minute, fmt.Sprintf("%d SDK subscribes with the server stopped", tries), func() bool { return counted.n.Load() >= tries })
	// A try in flight holds its callback; the failed ones must hold none.
	if n := nacos.SDKCallbacks(t, cli, svc); n > 1 {
		t.Fatalf("after %d failed subscribes the SDK holds %d callbacks for %s, want at most 1 (the try in flight)", counted.n.Load(), n, svc)
	}
	srv.Start()
	testutil.WaitFor(t, 30*time.Second, "a synced update", func() bool {
		u, err := w.Next(ctx)
		return err == nil && u.Synced && !u.Stale
	})
	if n := nacos.SDKCallbacks(t, cli, svc); n != 1 {
		t.Fatalf("with one watch open after %d failed subscribes the SDK holds %d callbacks for %s, want 1", counted.n.Load()-1, n, svc)
	}
	w.Close()
	testutil.WaitFor(t, 30*time.Second, "the server to have no subscriber and the SDK no callback", func() bool {
		return srv.Subscribers("", "", svc) == 0 && nacos.SDKCallbacks(t, cli, svc) == 0
	})
}
