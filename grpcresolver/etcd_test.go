package grpcresolver_test

import (
	"context"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// etcdEnv is a real etcd (a child process) with the registrars' clients,
// so that a crash can close a client under its registry.
type etcdEnv struct {
	srv  *testserver.Etcd
	mu   sync.Mutex
	clis map[registry.Registry]*clientv3.Client
}

func newEtcdEnv(t testing.TB) *etcdEnv {
	return &etcdEnv{srv: testserver.StartEtcd(t), clis: map[registry.Registry]*clientv3.Client{}}
}

func (e *etcdEnv) URL() string { return "etcd://" + e.srv.Endpoint() }

func (e *etcdEnv) NewRegistry(t testing.TB, ttl time.Duration) registry.Registry {
	return e.newRegistry(t, ttl, "")
}

func (e *etcdEnv) newRegistry(t testing.TB, ttl time.Duration, prefix string) registry.Registry {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.srv.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	r, err := etcd.New(cli, &etcd.Options{TTL: ttl, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.clis[r] = cli
	e.mu.Unlock()
	t.Cleanup(func() { _ = r.Close(); _ = cli.Close() })
	return r
}

// Crash closes the client first, so that nothing is revoked or deleted.
func (e *etcdEnv) Crash(t testing.TB, r registry.Registry) {
	e.mu.Lock()
	cli := e.clis[r]
	e.mu.Unlock()
	_ = cli.Close()
	_ = r.Close()
}

func (e *etcdEnv) Pause(testing.TB)  { e.srv.Pause() }
func (e *etcdEnv) Resume(testing.TB) { e.srv.Resume() }
func (e *etcdEnv) Stop(testing.TB)   { e.srv.Stop() }
func (e *etcdEnv) Start(testing.TB)  { e.srv.Start() }

func TestGRPCEtcd(t *testing.T) {
	// The outage outlasts the registrars' TTL and the time the etcd backend
	// takes to notice a frozen server (progress requests, 2s + 3s).
	testGRPC(t, func(t testing.TB) env { return newEtcdEnv(t) }, 7*time.Second)
}

func TestSelectionEtcd(t *testing.T) {
	testSelection(t, func(t testing.TB) env { return newEtcdEnv(t) })
}

func TestGRPCEtcdPrefix(t *testing.T) {
	e := newEtcdEnv(t)
	// team-a's registrars use etcd://host/team-a, whose keys live under
	// /rollcall/team-a/.
	teamA := e.newRegistry(t, time.Second, etcd.DefaultPrefix+"team-a/")
	other := startServer(t, e, "echo", "default-prefix", time.Second, nil)
	lisA := startServer(t, e, "echo", "unused", time.Second, nil) // a gRPC server for team-a
	_ = lisA.rr.Deregister(context.Background())
	register(t, teamA, registry.Instance{Service: "echo", ID: "team-a-1", Addr: lisA.addr})

	conn := dial(t, e.URL()+"/team-a/echo")
	for range 20 {
		addr, err := call(context.Background(), conn)
		if err != nil {
			t.Fatal(err)
		}
		if addr != lisA.addr {
			t.Fatalf("etcd://host/team-a/echo reached %s, which is registered under the default prefix", addr)
		}
	}
	conn = dial(t, e.URL()+"/echo")
	for range 20 {
		addr, err := call(context.Background(), conn)
		if err != nil {
			t.Fatal(err)
		}
		if addr != other.addr {
			t.Fatalf("etcd://host/echo reached %s, which is registered under team-a", addr)
		}
	}
}

func TestResolverKeepsLastListWhileEtcdDown(t *testing.T) {
	for _, fault := range []string{"stopped", "paused"} {
		t.Run(fault, func(t *testing.T) {
			e := newEtcdEnv(t)
			// The leases outlive the outage (see testGRPC).
			reg := e.NewRegistry(t, 15*time.Second)
			for i, id := range []string{"a", "b", "c"} {
				register(t, reg, registry.Instance{Service: "svc", ID: id, Addr: "127.0.0.1:" + string(rune('1'+i)) + "000"})
			}
			cc := &recordingCC{}
			build(t, grpcresolver.NewBuilder("etcd"), e.URL()+"/svc", cc, resolver.BuildOptions{})
			waitFor(t, 10*time.Second, "three endpoints", func() bool { return len(cc.ids()) == 3 })
			if fault == "stopped" {
				e.Stop(t)
			} else {
				e.Pause(t)
			}
			time.Sleep(7 * time.Second) // the outage: past the TTL and the watch's failure detection
			if n, errs := cc.count(); n != 1 || errs != 0 {
				t.Fatalf("while etcd was %s: %d states and %d errors pushed, want none", fault, n-1, errs)
			}
			if fault == "stopped" {
				e.Start(t)
			} else {
				e.Resume(t)
			}
			register(t, reg, registry.Instance{Service: "svc", ID: "d", Addr: "127.0.0.1:4000"})
			waitFor(t, 15*time.Second, "four endpoints", func() bool { return len(cc.ids()) == 4 })
			cc.mu.Lock()
			defer cc.mu.Unlock()
			for i, s := range cc.states {
				if len(s.Endpoints) < 3 {
					t.Errorf("state %d has %d endpoints: the list shrank", i, len(s.Endpoints))
				}
			}
		})
	}
}
