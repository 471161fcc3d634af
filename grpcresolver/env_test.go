package grpcresolver_test

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// env is a real registry server with fault controls, as the resolver tests
// need it.
type env interface {
	// URL is the registry URL that registry.Open takes.
	URL() string
	// NewRegistry returns a client of the server, as another process has.
	NewRegistry(t testing.TB, ttl time.Duration) registry.Registry
	// Crash stops r's keepalives without deregistering, as a crash does.
	Crash(t testing.TB, r registry.Registry)
	Pause(t testing.TB)
	Resume(t testing.TB)
	Stop(t testing.TB)
	Start(t testing.TB)
}

var memSeq atomic.Int64

type memEnv struct {
	name string
	srv  *memory.Server
}

func newMemEnv(t testing.TB) *memEnv {
	name := fmt.Sprintf("grpcresolver-%d", memSeq.Add(1))
	return &memEnv{name: name, srv: memory.NamedServer(name)}
}

func (e *memEnv) URL() string { return "mem://" + e.name }
func (e *memEnv) NewRegistry(t testing.TB, ttl time.Duration) registry.Registry {
	r := memory.New(e.srv, &memory.Options{TTL: ttl})
	t.Cleanup(func() { _ = r.Close() })
	return r
}
func (e *memEnv) Crash(t testing.TB, r registry.Registry) { r.(*memory.Registry).Crash() }
func (e *memEnv) Pause(testing.TB)                        { e.srv.Pause() }
func (e *memEnv) Resume(testing.TB)                       { e.srv.Resume() }
func (e *memEnv) Stop(testing.TB)                         { e.srv.Stop() }
func (e *memEnv) Start(testing.TB)                        { e.srv.Start() }

// server is a real gRPC server (the standard health service) registered in
// the registry.
type server struct {
	id   string
	addr string
	srv  *grpc.Server
	reg  registry.Registry
	rr   *registry.Registration
	once sync.Once
}

func startServer(t testing.TB, e env, service, id string, ttl time.Duration, md map[string]string) *server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{id: id, addr: lis.Addr().String(), srv: grpc.NewServer()}
	healthpb.RegisterHealthServer(s.srv, health.NewServer())
	go func() { _ = s.srv.Serve(lis) }() // ends with Stop
	t.Cleanup(s.stop)
	s.reg = e.NewRegistry(t, ttl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.rr, err = s.reg.Register(ctx, registry.Instance{Service: service, ID: id, Addr: s.addr, Metadata: md})
	if err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	return s
}

func (s *server) stop() { s.once.Do(s.srv.Stop) }

// crash stops the gRPC server at once and the registration's keepalives,
// without deregistering.
func (s *server) crash(t testing.TB, e env) {
	s.stop()
	e.Crash(t, s.reg)
}

func dial(t testing.TB, target string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(target, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		t.Fatalf("grpc.NewClient(%q): %v", target, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// call makes one health check and returns the address of the server that
// answered.
func call(ctx context.Context, conn *grpc.ClientConn, opts ...grpc.CallOption) (string, error) {
	var p peer.Peer
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, append(opts, grpc.Peer(&p))...)
	if err != nil {
		return "", err
	}
	return p.Addr.String(), nil
}

var waitFor = testutil.WaitFor
