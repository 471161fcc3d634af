package selector_test

import (
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/selector"
)

// newEtcdEnv is an env over a real etcd (a child process).
func newEtcdEnv(t testing.TB) *env {
	srv := testserver.StartEtcd(t)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := etcd.New(cli, &etcd.Options{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close(); _ = cli.Close() })
	return &env{reg: reg}
}

func TestTransportOverEtcd(t *testing.T) {
	e := newEtcdEnv(t)
	version := func(v string, w int) map[string]string {
		return map[string]string{registry.MetaVersion: v, registry.MetaWeight: fmt.Sprint(w)}
	}
	a := e.start(t, "web", "a", version("v2", 1))
	e.start(t, "web", "b", version("v2", 3))
	e.start(t, "web", "c", version("v1", 1))
	c := client(t, e.picker(t, "web", &selector.Options{Filter: registry.MatchMetadata(registry.MetaVersion, "v2")}))
	counts := getN(t, c, "http://web/", 4000)
	checkShare(t, counts, "a", 1000)
	checkShare(t, counts, "b", 3000)
	if counts["c"] != 0 {
		t.Fatalf("the v1 instance got %d requests", counts["c"])
	}
	update(t, a, "web", version("v2", 3))
	waitFor(t, 10*time.Second, "an even split after a's weight change", func() bool {
		return getN(t, c, "http://web/", 400)["a"] == 200
	})
}
