package grpcresolver_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	_ "github.com/rollcall-go/rollcall/backends/memory" // mem:// registries
	"github.com/rollcall-go/rollcall/grpcresolver"      // mem://, etcd://, ... gRPC targets
	"github.com/rollcall-go/rollcall/registry"
)

// A server registers itself in a registry; a client dials the service by
// the registry's URL with the service name appended. The in-process mem://
// registry stands in for etcd://host:2379 and the others.
func Example() {
	ctx := context.Background()

	// The server: serve, then register.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	defer srv.Stop()

	reg, err := registry.Open(ctx, "mem://example")
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	rr, err := reg.Register(ctx, registry.Instance{Service: "user.rpc", Addr: lis.Addr().String()})
	if err != nil {
		log.Fatal(err)
	}
	defer rr.Deregister(ctx)

	// The client: the registry URL with the service as the last segment.
	conn, err := grpc.NewClient("mem://example/user.rpc", grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(cctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(resp.Status)
	// Output: SERVING
}

// SplitTarget shows how a target divides into the registry URL and the
// service name.
func ExampleSplitTarget() {
	for _, target := range []string{
		"etcd://10.0.0.1:2379,10.0.0.2:2379/user.rpc",
		"etcd://10.0.0.1:2379/team-a/user.rpc?ttl=5s",
		"k8s://default/user:8080",
		"etcd://10.0.0.1:2379/user.rpc?dial-timeout=3s&meta.version=v2",
	} {
		reg, service, err := grpcresolver.SplitTarget(target)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s: registry %s, service %s\n", target, reg, service)
	}
	// Output:
	// etcd://10.0.0.1:2379,10.0.0.2:2379/user.rpc: registry etcd://10.0.0.1:2379,10.0.0.2:2379, service user.rpc
	// etcd://10.0.0.1:2379/team-a/user.rpc?ttl=5s: registry etcd://10.0.0.1:2379/team-a?ttl=5s, service user.rpc
	// k8s://default/user:8080: registry k8s://default, service user:8080
	// etcd://10.0.0.1:2379/user.rpc?dial-timeout=3s&meta.version=v2: registry etcd://10.0.0.1:2379?dial-timeout=3s, service user.rpc
}

// A client in zone eu-1a that prefers its zone's instances, weighted, while
// at least two of them are ready, and sees only instances of version v2:
// the policy from the builder's service config, the filter from the target
// (WithFilter takes one from code).
func Example_zoneAndVersion() {
	b := grpcresolver.NewBuilder("etcd", grpcresolver.WithServiceConfig(grpcresolver.ZoneServiceConfig("eu-1a", 2)))
	conn, err := grpc.NewClient("etcd://127.0.0.1:2379/user.rpc?meta.version=v2",
		grpc.WithResolvers(b), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	fmt.Println(grpcresolver.ZoneServiceConfig("eu-1a", 2))
	// Output: {"loadBalancingConfig":[{"rollcall_zone_preference":{"zone":"eu-1a","minLocalReady":2}}]}
}
