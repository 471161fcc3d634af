package containers_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/internal/testserver/containers"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func requireContainers(t *testing.T) {
	t.Helper()
	if !containers.Selected() {
		t.Skipf("runs only with %s=%s: it needs a Docker engine and the server images (see docs/CI.md)",
			containers.EnvServers, containers.Provider)
	}
}

func etcdClient(t *testing.T, ep string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestEtcdFaults checks each fault control of an etcd container: a paused
// server does not answer, a stopped one keeps its data, a wiped one has none,
// all on the same address.
func TestEtcdFaults(t *testing.T) {
	requireContainers(t)
	e := containers.StartEtcd(t)
	cli := etcdClient(t, e.Endpoint())
	if _, err := cli.Put(ctxFor(t, 10*time.Second), "k", "v"); err != nil {
		t.Fatal(err)
	}

	e.Pause()
	_, err := cli.Get(ctxFor(t, time.Second), "k")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get from a paused etcd: %v, want a deadline error", err)
	}
	e.Resume()
	if _, err := cli.Get(ctxFor(t, 10*time.Second), "k"); err != nil {
		t.Fatalf("Get after Resume: %v", err)
	}

	e.Stop()
	if _, err := cli.Get(ctxFor(t, time.Second), "k"); err == nil {
		t.Fatal("Get from a stopped etcd succeeded")
	}
	e.Start()
	if resp, err := cli.Get(ctxFor(t, 10*time.Second), "k"); err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("after Stop and Start: %v, %v; want the key kept", resp, err)
	}

	e.Restart(true)
	if resp, err := cli.Get(ctxFor(t, 10*time.Second), "k"); err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("after a wipe: %v, %v; want no key", resp, err)
	}
}

// The GitHub Actions workflow pulls the default images before the tests:
// its list must follow Images.
func TestWorkflowPullsTheDefaultImages(t *testing.T) {
	path := filepath.Join("..", "..", "..", ".github", "workflows", "conformance.yml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	words := strings.Fields(string(b))
	for name, spec := range containers.Images {
		if spec.Default != "" && !slices.Contains(words, spec.Default) {
			t.Errorf("%s does not pull %s, the default image of %s", path, spec.Default, name)
		}
	}
}

// TestNacosControls checks the Nacos test server's container: the gRPC port
// is published at Addr's port + 1000, the control API answers, a paused
// server does not.
func TestNacosControls(t *testing.T) {
	requireContainers(t)
	if os.Getenv(containers.Images["nacos"].Env) == "" {
		t.Skipf("%s is not set: scripts/build-images.sh --env nacos-test-server builds the image and prints it", containers.Images["nacos"].Env)
	}
	n := containers.StartNacos(t)
	host, port, err := net.SplitHostPort(n.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	if got, want := n.HostPort(containers.NacosGRPCPort), net.JoinHostPort(host, strconv.Itoa(p+1000)); got != want {
		t.Fatalf("gRPC published on %s, want %s", got, want)
	}
	c, err := net.DialTimeout("tcp", n.HostPort(containers.NacosGRPCPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	n.SetPushDelay(200 * time.Millisecond)
	n.Inject("", "", "svc", model.Instance{Ip: "127.0.0.1", Port: 1, Enable: true, Healthy: true})
	if got := n.DropConnections(); got != 0 {
		t.Errorf("DropConnections = %d with no client, want 0", got)
	}
	n.Pause()
	ctx := ctxFor(t, time.Second)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.HostPort(containers.NacosControlPort)+"/healthz", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("a paused server answered")
	}
	n.Resume()
	n.Restart(false)
	n.SetPushDelay(time.Second) // answers again
}
