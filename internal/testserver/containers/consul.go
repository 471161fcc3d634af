package containers

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"testing"

	"github.com/moby/moby/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	tcconsul "github.com/testcontainers/testcontainers-go/modules/consul"
)

// ConsulPort is Consul's HTTP API port in the container.
const ConsulPort = "8500/tcp"

// Consul is a single-server Consul agent in a container (testcontainers'
// consul module) that bootstraps its own cluster and keeps its state in the
// container's file system, with the methods of testserver.ConsulServer:
// Stop and Start keep the catalog and the agent's registrations, Wipe drops
// them. Only the HTTP API is published; DNS and gRPC are disabled.
type Consul struct {
	*Server
}

// StartConsul starts the agent (image Image("consul"); the consul binary
// must be /bin/consul, as in the official image, whose entrypoint script is
// bypassed) and waits until it has a leader. The container is removed when
// the test ends.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	nodeID := randomUUID()
	s := &Server{
		t:     t,
		name:  "consul",
		image: Image("consul"),
		ports: []string{ConsulPort},
		customize: func(s *Server) []testcontainers.ContainerCustomizer {
			return []testcontainers.ContainerCustomizer{
				// Only the HTTP API (the module also exposes DNS).
				testcontainers.CustomizeRequestOption(func(req *testcontainers.GenericContainerRequest) error {
					req.ExposedPorts = []string{ConsulPort}
					return nil
				}),
				testcontainers.WithEntrypoint("/bin/consul"),
				testcontainers.WithCmd(
					"agent", "-server", "-bootstrap",
					"-data-dir=/consul/data",
					"-node=rollcall-test",
					"-node-id="+nodeID,
					// Raft and Serf on the container's loopback: a new IP
					// after a restart changes nothing.
					"-bind=127.0.0.1",
					"-client=0.0.0.0",
					"-http-port=8500",
					"-dns-port=-1",
					"-grpc-port=-1",
					"-grpc-tls-port=-1",
					"-log-level=warn",
					// Raft timings of -dev, as testserver.StartConsulServer.
					"-hcl=performance { raft_multiplier = 1 }",
					"-hcl=disable_update_check = true",
				),
				testcontainers.WithConfigModifier(func(c *container.Config) { c.User = "0:0" }),
			}
		},
		probe: func(ctx context.Context, s *Server) error {
			body, err := testserver.HTTPGet(ctx, "http://"+s.HostPort(ConsulPort)+"/v1/status/leader")
			if err != nil {
				return err
			}
			// The body is a JSON string: "" until there is a leader.
			if b := bytes.TrimSpace(body); len(b) < 3 || b[0] != '"' {
				return fmt.Errorf("no leader yet: %s", b)
			}
			return nil
		},
		runner: func(ctx context.Context, img string, opts ...testcontainers.ContainerCustomizer) (*testcontainers.DockerContainer, error) {
			c, err := tcconsul.Run(ctx, img, opts...)
			var dc *testcontainers.DockerContainer
			if c != nil && c.Container != nil {
				dc, _ = c.Container.(*testcontainers.DockerContainer)
			}
			return dc, err
		},
	}
	s.start()
	return &Consul{s}
}

// Addr returns the address of the HTTP API on the host, 127.0.0.1:port.
func (c *Consul) Addr() string { return c.HostPort(ConsulPort) }

// randomUUID returns a random (version 4) UUID.
func randomUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
