package interop

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zeromicro/go-zero/core/conf"
	"github.com/zeromicro/go-zero/core/discov"
	"github.com/zeromicro/go-zero/zrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// addrs returns the sorted addresses of list.
func addrs(list []registry.Instance) []string {
	out := make([]string, 0, len(list))
	for _, in := range list {
		out = append(out, in.Addr)
	}
	slices.Sort(out)
	return out
}

func lookup(t *testing.T, r registry.Registry, service string) []registry.Instance {
	t.Helper()
	list, err := r.Lookup(ctxT(t), service)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", service, err)
	}
	return list
}

// TestGoZeroPublisherIsFoundByRollcall: what go-zero's discov.Publisher
// writes (KEY/<lease ID> holding host:port) is an instance to a rollcall
// registry with layout=gozero, its ID the lease ID from the key; Stop (which
// revokes the lease) removes it from a rollcall Watcher.
func TestGoZeroPublisherIsFoundByRollcall(t *testing.T) {
	ep := startEtcd(t)
	pub := discov.NewPublisher([]string{ep}, "user.rpc", "127.0.0.1:9001")
	if err := pub.KeepAlive(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			pub.Stop()
		}
	})
	r := open(t, "etcd://"+ep+"/?layout=gozero")
	w, err := r.Watch(ctxT(t), "user.rpc")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var in registry.Instance
	for in.Addr == "" {
		u, err := w.Next(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if list := u.Instances(); len(list) == 1 {
			in = list[0]
		}
	}
	// The ID is the key's last segment: the lease ID in decimal.
	kv := keys(t, adminClient(t, ep), "user.rpc/")
	if len(kv) != 1 || kv["user.rpc/"+in.ID] != "127.0.0.1:9001" {
		t.Fatalf("etcd holds %v; rollcall read %v", kv, in)
	}
	if _, err := strconv.ParseInt(in.ID, 10, 64); err != nil || in.Addr != "127.0.0.1:9001" || len(in.Metadata) != 0 {
		t.Fatalf("rollcall read %+v; want ID = go-zero's lease ID, Addr 127.0.0.1:9001, no metadata", in)
	}
	pub.Stop()
	stopped = true
	for {
		u, err := w.Next(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Removed) == 1 && u.Removed[0].ID == in.ID && len(u.Instances()) == 0 {
			break
		}
	}
}

// TestRollcallIsFoundByGoZeroSubscriber: a rollcall registration with
// layout=gozero is a value of go-zero's discov.Subscriber for the same key,
// and leaves it when deregistered.
func TestRollcallIsFoundByGoZeroSubscriber(t *testing.T) {
	ep := startEtcd(t)
	r := open(t, "etcd://"+ep+"/?layout=gozero")
	reg, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9002"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", ID: "b", Addr: "127.0.0.1:9003"}); err != nil {
		t.Fatal(err)
	}
	// The keys and values are go-zero's: KEY/ID, plain host:port.
	if kv := keys(t, adminClient(t, ep), "user.rpc/"); len(kv) != 2 || kv["user.rpc/a"] != "127.0.0.1:9002" || kv["user.rpc/b"] != "127.0.0.1:9003" {
		t.Fatalf("etcd holds %v", kv)
	}
	sub, err := discov.NewSubscriber([]string{ep}, "user.rpc")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	values := func() []string { v := sub.Values(); slices.Sort(v); return v }
	testutil.WaitFor(t, 10*time.Second, "go-zero's Subscriber to list both", func() bool {
		return slices.Equal(values(), []string{"127.0.0.1:9002", "127.0.0.1:9003"})
	})
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "go-zero's Subscriber to drop the deregistered one", func() bool {
		return slices.Equal(values(), []string{"127.0.0.1:9003"})
	})
}

// TestGoZeroLayoutRefusesMetadata: go-zero's values hold an address only,
// so an instance with metadata is refused with ErrInvalidInstance, and
// nothing is written; an Update that adds metadata is refused too and
// leaves the value as it was.
func TestGoZeroLayoutRefusesMetadata(t *testing.T) {
	ep := startEtcd(t)
	r := open(t, "etcd://"+ep+"/?layout=gozero")
	_, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9002", Metadata: map[string]string{"zone": "z1"}})
	if !errors.Is(err, registry.ErrInvalidInstance) || !strings.Contains(err.Error(), "gozero") {
		t.Fatalf("Register with metadata = %v; want ErrInvalidInstance naming the layout", err)
	}
	admin := adminClient(t, ep)
	if kv := keys(t, admin, "user.rpc/"); len(kv) != 0 {
		t.Fatalf("a refused registration wrote %v", kv)
	}
	reg, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9002"})
	if err != nil {
		t.Fatal(err)
	}
	err = reg.Update(ctxT(t), registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9004", Metadata: map[string]string{"zone": "z1"}})
	if !errors.Is(err, registry.ErrInvalidInstance) {
		t.Fatalf("Update with metadata = %v; want ErrInvalidInstance", err)
	}
	if kv := keys(t, admin, "user.rpc/"); kv["user.rpc/a"] != "127.0.0.1:9002" {
		t.Fatalf("a refused update changed the value: %v", kv)
	}
}

// serveHealth starts a gRPC server with the health service on a free
// loopback port and returns its address.
func serveHealth(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(lis) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return lis.Addr().String()
}

// checkHealth makes one health call through conn.
func checkHealth(ctx context.Context, conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// TestOneBinaryWithZRPC: this test binary links go-zero's zrpc (whose init
// registers the gRPC schemes etcd and k8s) and rollcall's grpcresolver, and
// chooses explicitly (this package's init, see main_test.go): plain etcd://
// is go-zero's, rollcall+etcd:// is rollcall's. Across the two, a zrpc
// client reaches a gRPC server that rollcall registered with the go-zero
// layout, and a rollcall-resolved client reaches one that go-zero's
// Publisher registered.
func TestOneBinaryWithZRPC(t *testing.T) {
	for scheme, wantPkg := range map[string]string{
		"etcd":          "github.com/zeromicro/go-zero/",
		"k8s":           "github.com/zeromicro/go-zero/",
		"rollcall+etcd": "github.com/rollcall-go/rollcall/grpcresolver",
		"rollcall+k8s":  "github.com/rollcall-go/rollcall/grpcresolver",
	} {
		b := resolver.Get(scheme)
		if b == nil || !strings.HasPrefix(pkgOf(b), wantPkg) {
			t.Errorf("gRPC's builder for %s is from %q; want %s", scheme, pkgOf(b), wantPkg)
		}
	}
	ep := startEtcd(t)

	// A rollcall server, registered in go-zero's layout, called by zrpc.
	rollcallSrv := serveHealth(t)
	r := open(t, "etcd://"+ep+"/?layout=gozero")
	if _, err := r.Register(ctxT(t), registry.Instance{Service: "rollcall.rpc", ID: "a", Addr: rollcallSrv}); err != nil {
		t.Fatal(err)
	}
	var cc zrpc.RpcClientConf
	if err := conf.FillDefault(&cc); err != nil {
		t.Fatal(err)
	}
	cc.Etcd = discov.EtcdConf{Hosts: []string{ep}, Key: "rollcall.rpc"}
	zc, err := zrpc.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	defer zc.Conn().Close()
	testutil.WaitFor(t, 10*time.Second, "a zrpc call to the rollcall server", func() bool {
		return checkHealth(ctxT(t), zc.Conn()) == nil
	})

	// A go-zero server (its Publisher, as zrpc's server runs it), called
	// through rollcall's resolver.
	goZeroSrv := serveHealth(t)
	pub := discov.NewPublisher([]string{ep}, "gozero.rpc", goZeroSrv)
	if err := pub.KeepAlive(); err != nil {
		t.Fatal(err)
	}
	defer pub.Stop()
	conn, err := grpc.NewClient(grpcresolver.SchemePrefix+"etcd://"+ep+"/gozero.rpc?layout=gozero",
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	testutil.WaitFor(t, 10*time.Second, "a rollcall-resolved call to the go-zero server", func() bool {
		return checkHealth(ctxT(t), conn) == nil
	})
	// Per channel, rollcall's builder serves a plain etcd:// target too,
	// whatever the global registry holds.
	conn2, err := grpc.NewClient("etcd://"+ep+"/gozero.rpc?layout=gozero",
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(grpcresolver.NewBuilder("etcd")))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	testutil.WaitFor(t, 10*time.Second, "a call through grpcresolver.NewBuilder(\"etcd\")", func() bool {
		return checkHealth(ctxT(t), conn2) == nil
	})
}
