package etcd_test

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

func TestMain(m *testing.M) {
	code := m.Run()
	stopExampleEtcd()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// The examples talk to a real etcd: an embedded one on a free port of
// 127.0.0.1, started by the first example that asks (examples run after
// the tests) and stopped by TestMain. In your code the endpoint is your
// cluster's, "127.0.0.1:2379" say.
var example struct {
	once     sync.Once
	etcd     *embed.Etcd
	endpoint string
}

func exampleEndpoint() string {
	example.once.Do(func() {
		dir, err := os.MkdirTemp("", "rollcall-etcd-example-")
		if err != nil {
			panic(err)
		}
		ports, err := testserver.FreePorts(2)
		if err != nil {
			panic(err)
		}
		cfg := embed.NewConfig()
		cfg.Name, cfg.Dir = "example", dir
		cu := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))}
		pu := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1]))}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.InitialCluster = cfg.Name + "=" + pu.String()
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			panic(err)
		}
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(30 * time.Second):
			panic("the examples' etcd did not become ready within 30s")
		}
		example.etcd, example.endpoint = e, cu.Host
	})
	return example.endpoint
}

func stopExampleEtcd() {
	if example.etcd != nil {
		dir := example.etcd.Config().Dir
		example.etcd.Close()
		os.RemoveAll(dir)
	}
}

// Register an instance, watch its service, deregister it: the typical use,
// through a URL (the path is a key prefix; ttl is the lease's).
func Example() {
	ctx := context.Background()
	r, err := registry.Open(ctx, "etcd://"+exampleEndpoint()+"/?ttl=10s")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()

	reg, err := r.Register(ctx, registry.Instance{Service: "greeter", ID: "greeter-1", Addr: "10.0.0.1:8080", Metadata: map[string]string{"version": "v1"}})
	if err != nil {
		fmt.Println(err)
		return
	}
	w, err := r.Watch(ctx, "greeter")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer w.Close()
	u, err := w.Next(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, in := range u.Instances() {
		fmt.Println("watched:", in.ID, in.Addr, in.Metadata["version"])
	}

	// Deregister with a context of its own, not one a signal canceled.
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := reg.Deregister(dctx); err != nil {
		fmt.Println(err)
		return
	}
	if u, err = w.Next(ctx); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("removed:", u.Removed[0].ID, "left:", len(u.Instances()))
	// Output:
	// watched: greeter-1 10.0.0.1:8080 v1
	// removed: greeter-1 left: 0
}

// New takes a clientv3 client the caller already holds (its TLS, auth and
// dial settings); Close leaves it open.
func ExampleNew() {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{exampleEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cli.Close()
	r, err := etcd.New(cli, &etcd.Options{Prefix: "/team-a/", TTL: 10 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()

	ctx := context.Background()
	if _, err := r.Register(ctx, registry.Instance{Service: "billing", Addr: "10.0.0.2:9090"}); err != nil {
		fmt.Println(err)
		return
	}
	got, err := r.Lookup(ctx, "billing")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("looked up:", got[0].ID, got[0].Addr)

	// The key, as etcdctl get --prefix /team-a/ shows it.
	resp, err := cli.Get(ctx, "/team-a/billing/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, kv := range resp.Kvs {
		fmt.Println("key:", string(kv.Key))
	}
	// Output:
	// looked up: 10.0.0.2:9090 10.0.0.2:9090
	// key: /team-a/billing/10.0.0.2:9090
}
