package grpcresolver_test

import (
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	_ "github.com/rollcall-go/rollcall/backends/static" // static:// targets
)

// A static:// target balances over the fixed endpoints it lists.
func TestStaticTarget(t *testing.T) {
	var servers []*server
	target := "static://"
	for i := range 2 {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := &server{addr: lis.Addr().String(), srv: grpc.NewServer()}
		healthpb.RegisterHealthServer(s.srv, health.NewServer())
		go func() { _ = s.srv.Serve(lis) }() // ends with Stop
		t.Cleanup(s.stop)
		servers = append(servers, s)
		if i > 0 {
			target += ","
		}
		target += s.addr
	}
	conn := dial(t, target+"/user.rpc")
	waitAllServing(t, conn, servers)
	if counts := callN(t, conn, 20); len(counts) != 2 {
		t.Fatalf("20 calls reached %v, want both endpoints", counts)
	}
}
