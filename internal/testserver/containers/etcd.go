package containers

import (
	"bytes"
	"context"
	"fmt"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"testing"

	"github.com/moby/moby/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	tcetcd "github.com/testcontainers/testcontainers-go/modules/etcd"
)

// EtcdPort is etcd's client port in the container.
const EtcdPort = "2379/tcp"

// Etcd is a single-member etcd cluster in a container (testcontainers' etcd
// module), with the methods of testserver.Etcd. Its data directory is in the
// container's file system: Stop and Start keep it, Wipe drops it.
type Etcd struct {
	*Server
}

// StartEtcd starts etcd (image Image("etcd"); the etcd binary must be on
// the image's PATH, as in the official images) and waits until it serves
// requests. The container is removed when the test ends.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	s := &Server{
		t:     t,
		name:  "etcd",
		image: Image("etcd"),
		ports: []string{EtcdPort},
		customize: func(s *Server) []testcontainers.ContainerCustomizer {
			return []testcontainers.ContainerCustomizer{
				tcetcd.WithAdditionalArgs(
					"--data-dir=/var/lib/etcd/rollcall",
					// What clients outside see (the module advertises 0.0.0.0).
					"--advertise-client-urls=http://"+s.HostPort(EtcdPort),
					// Peer traffic stays on the container's loopback, so that
					// a new IP after a restart changes nothing.
					"--listen-peer-urls=http://127.0.0.1:2380",
					"--initial-advertise-peer-urls=http://127.0.0.1:2380",
					"--initial-cluster=default=http://127.0.0.1:2380",
					"--initial-cluster-state=new",
					"--initial-cluster-token=rollcall-test",
					// As testserver.StartEtcd: small and fast.
					"--snapshot-count=1000",
					"--unsafe-no-fsync",
					"--quota-backend-bytes=268435456",
					"--heartbeat-interval=50",
					"--election-timeout=500",
					"--log-level=warn",
				),
				// Run as root: the data directory is created where the
				// image may not have it.
				testcontainers.WithConfigModifier(func(c *container.Config) { c.User = "0:0" }),
			}
		},
		probe: func(ctx context.Context, s *Server) error {
			body, err := testserver.HTTPGet(ctx, "http://"+s.HostPort(EtcdPort)+"/health")
			if err != nil {
				return err
			}
			if !bytes.Contains(body, []byte(`"health":"true"`)) {
				return fmt.Errorf("not healthy: %s", bytes.TrimSpace(body))
			}
			return nil
		},
		runner: func(ctx context.Context, img string, opts ...testcontainers.ContainerCustomizer) (*testcontainers.DockerContainer, error) {
			c, err := tcetcd.Run(ctx, img, opts...)
			var dc *testcontainers.DockerContainer
			if c != nil && c.Container != nil {
				dc, _ = c.Container.(*testcontainers.DockerContainer)
			}
			return dc, err
		},
	}
	s.start()
	return &Etcd{s}
}

// Endpoint returns the client address on the host, 127.0.0.1:port.
func (e *Etcd) Endpoint() string { return e.HostPort(EtcdPort) }
