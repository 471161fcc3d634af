package grpcresolver_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// These tests run real gRPC servers that register in a real registry server
// and a gRPC client that dials them through the globally registered
// resolver, as an application does.

func TestGRPCMemory(t *testing.T) {
	testGRPC(t, func(t testing.TB) env { return newMemEnv(t) }, 2*time.Second)
}

// testGRPC runs the end-to-end tests against registry servers made by mk;
// outage is how long each registry outage lasts.
func testGRPC(t *testing.T, mk func(t testing.TB) env, outage time.Duration) {
	const ttl = time.Second
	// Registrations outlive the outages: a registry frozen for longer than
	// the TTL (etcd under SIGSTOP) expires their leases when it resumes,
	// which is the registry's truth, not the resolver's business.
	outageTTL := 2 * outage
	t.Run("CallsSpreadOverAllServers", func(t *testing.T) {
		e := mk(t)
		servers := startServers(t, e, "echo", ttl, 3)
		conn := dial(t, e.URL()+"/echo")
		waitAllServing(t, conn, servers)
		counts := callN(t, conn, 300)
		for _, s := range servers {
			if counts[s.addr] < 60 {
				t.Errorf("server %s got %d of 300 calls: %v", s.id, counts[s.addr], counts)
			}
		}
	})

	t.Run("CrashedServerStopsReceivingCalls", func(t *testing.T) {
		e := mk(t)
		servers := startServers(t, e, "echo", ttl, 3)
		conn := dial(t, e.URL()+"/echo")
		waitAllServing(t, conn, servers)
		crashed := servers[1]
		crashed.crash(t, e)
		// gRPC sees the broken connections at once; the registry drops the
		// instance when its lease expires.
		failed := 0
		took := waitFor(t, 2*time.Second, "50 calls in a row served by the others", func() bool {
			for range 50 {
				addr, err := call(context.Background(), conn)
				if err != nil {
					failed++
					return false
				}
				if addr == crashed.addr {
					return false
				}
			}
			return true
		})
		t.Logf("calls moved off the crashed server within %v (%d calls failed meanwhile)", took.Round(time.Millisecond), failed)
		counts := callN(t, conn, 100)
		if counts[crashed.addr] > 0 || counts[servers[0].addr] == 0 || counts[servers[2].addr] == 0 {
			t.Fatalf("after the crash: %v", counts)
		}
	})

	t.Run("NewServerReceivesCallsWithinASecond", func(t *testing.T) {
		e := mk(t)
		servers := startServers(t, e, "echo", ttl, 2)
		conn := dial(t, e.URL()+"/echo")
		waitAllServing(t, conn, servers)
		s := startServer(t, e, "echo", "server-new", ttl, nil)
		took := waitFor(t, time.Second, "a call served by the new server", func() bool {
			addr, err := call(context.Background(), conn)
			return err == nil && addr == s.addr
		})
		t.Logf("the new server got its first call %v after its registration returned", took.Round(time.Millisecond))
	})

	for _, fault := range []string{"paused", "stopped"} {
		t.Run("CallsSucceedWhileRegistry"+strings.ToUpper(fault[:1])+fault[1:], func(t *testing.T) {
			e := mk(t)
			servers := startServers(t, e, "echo", outageTTL, 3)
			conn := dial(t, e.URL()+"/echo")
			waitAllServing(t, conn, servers)
			if fault == "paused" {
				e.Pause(t)
			} else {
				e.Stop(t)
			}
			counts := map[string]int{}
			calls := 0
			for start := time.Now(); time.Since(start) < outage; calls++ {
				addr, err := call(context.Background(), conn)
				if err != nil {
					t.Fatalf("call %d, %v into the outage: %v", calls, time.Since(start).Round(time.Millisecond), err)
				}
				counts[addr]++
				time.Sleep(2 * time.Millisecond) // call rate, not synchronisation
			}
			for _, s := range servers {
				if counts[s.addr] == 0 {
					t.Errorf("server %s got no calls while the registry was %s: %v", s.id, fault, counts)
				}
			}
			t.Logf("%d calls succeeded while the registry was %s for %v", calls, fault, outage)
			if fault == "paused" {
				e.Resume(t)
			} else {
				e.Start(t)
			}
			// The registry is back: a new server is found again.
			s := startServer(t, e, "echo", "server-after", outageTTL, nil)
			waitFor(t, 10*time.Second, "a call served by the server registered after the outage", func() bool {
				addr, err := call(context.Background(), conn)
				return err == nil && addr == s.addr
			})
			counts = callN(t, conn, 100)
			for _, s := range append(servers, s) {
				if counts[s.addr] == 0 {
					t.Errorf("after the outage server %s got no calls: %v", s.id, counts)
				}
			}
		})
	}

	t.Run("UnknownServiceFailsCalls", func(t *testing.T) {
		e := mk(t)
		conn := dial(t, e.URL()+"/nobody")
		_, err := call(context.Background(), conn)
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("call to a service with no instances: %v, want Unavailable", err)
		}
	})
}

func startServers(t *testing.T, e env, service string, ttl time.Duration, n int) []*server {
	t.Helper()
	out := make([]*server, n)
	for i := range out {
		out[i] = startServer(t, e, service, fmt.Sprintf("server-%d", i+1), ttl, nil)
	}
	return out
}

// waitAllServing waits until every server has answered a call.
func waitAllServing(t *testing.T, conn *grpc.ClientConn, servers []*server) {
	t.Helper()
	seen := map[string]bool{}
	waitFor(t, 10*time.Second, "every server answering", func() bool {
		addr, err := call(context.Background(), conn)
		if err == nil {
			seen[addr] = true
		}
		for _, s := range servers {
			if !seen[s.addr] {
				return false
			}
		}
		return true
	})
}

// callN makes n calls, all of which must succeed, and counts them per server.
func callN(t *testing.T, conn *grpc.ClientConn, n int) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for i := range n {
		addr, err := call(context.Background(), conn)
		if err != nil {
			t.Fatalf("call %d of %d: %v", i+1, n, err)
		}
		counts[addr]++
	}
	return counts
}

func TestUnlinkedBackendGivesAClearError(t *testing.T) {
	// No nacos backend is linked into this test binary.
	if registry.DefaultURLMux().ValidScheme("nacos") {
		t.Skip("the nacos backend is linked into this test binary")
	}
	conn := dial(t, "nacos://127.0.0.1:8848/user.rpc")
	_, err := call(context.Background(), conn)
	want := `forgotten import?); link the backend with import _ "github.com/rollcall-go/rollcall/backends/nacos"`
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), want) {
		t.Fatalf("call through an unlinked scheme: %v; want Unavailable saying %s", err, want)
	}
}

func TestWithResolversAndATypedRegistry(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	servers := startServers(t, e, "echo", time.Second, 2)
	b := grpcresolver.NewBuilder("rollcall", grpcresolver.WithRegistry(reg), grpcresolver.WithServiceConfig(`{"loadBalancingConfig":[{"pick_first":{}}]}`))
	conn := dial(t, "rollcall:///echo", grpc.WithResolvers(b))
	counts := callN(t, conn, 20)
	if len(counts) != 1 {
		t.Fatalf("pick_first from WithServiceConfig spread calls over %d servers: %v", len(counts), counts)
	}
	_ = servers
	if err := reg.Ping(context.Background()); err != nil {
		t.Fatalf("the builder closed a registry it was given: %v", err)
	}
}
