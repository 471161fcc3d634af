package etcd_test

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
)

// serverWatchers reads etcd's count of watchers from its /metrics.
func serverWatchers(t testing.TB, ep string) int {
	t.Helper()
	return int(serverMetric(t, ep, "etcd_debugging_mvcc_watcher_total"))
}

// serverMetric reads one unlabelled metric from etcd's /metrics.
func serverMetric(t testing.TB, ep, name string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ep+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s %q", name, v)
			}
			return n
		}
	}
	t.Fatalf("no %s in %s/metrics (%v)", name, ep, sc.Err())
	return 0
}

// 100 Watchers of one service in one Registry (100 gRPC ClientConns of a
// service) are one watcher on the etcd server, counted by the server. Before
// they were 100.
func TestWatchersOfAServiceAreOneEtcdWatcher(t *testing.T) {
	srv := testserver.StartEtcd(t)
	r := idleRegistry(t, srv.Endpoint(), etcd.Options{TTL: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Nothing registered through this server: no registrar's guard watch
	// is counted with them.
	before := serverWatchers(t, srv.Endpoint())
	const n = 100
	for range n {
		w, err := r.Watch(ctx, "fan")
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		if u, err := w.Next(ctx); err != nil || u.Stale || len(u.Instances()) != 0 {
			t.Fatalf("first update %v, %v", &u, err)
		}
	}
	if got := serverWatchers(t, srv.Endpoint()) - before; got != 1 {
		t.Fatalf("%d Watchers of one service are %d etcd watchers, want 1", n, got)
	}
}
