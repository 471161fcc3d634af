package containers

import (
	"bytes"
	"context"
	"encoding/json"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"io"
	"net/http"
	"testing"

	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"
)

const (
	// ProxyAPIPort is toxiproxy's HTTP API in the container.
	ProxyAPIPort = "8474/tcp"
	// ProxyPort is where the proxy container listens for the client.
	ProxyPort = "20000/tcp"
)

// Proxy is a TCP proxy in a container (toxiproxy, image Image("toxiproxy"))
// on a user-defined network: the test process connects to Endpoint, the
// proxy forwards each connection to upstream, a host:port resolved on that
// network when the connection is made. Disconnecting the upstream server's
// container from the network cuts everything that goes through the proxy,
// and only that: the server's own published port keeps working.
type Proxy struct {
	*Server
}

// StartProxy starts a proxy on n to upstream (for example "etcd:2379", a
// network alias given to Server.Connect). The container is removed when the
// test ends.
func StartProxy(t testing.TB, n *Network, upstream string) *Proxy {
	t.Helper()
	s := &Server{
		t:     t,
		name:  "toxiproxy",
		image: Image("toxiproxy"),
		ports: []string{ProxyAPIPort, ProxyPort},
		customize: func(s *Server) []testcontainers.ContainerCustomizer {
			return []testcontainers.ContainerCustomizer{
				testcontainers.WithEntrypoint("/toxiproxy"),
				testcontainers.WithCmd("-host=0.0.0.0", "-port=8474"),
				tcnetwork.WithNetwork(nil, n.nw),
			}
		},
		probe: func(ctx context.Context, s *Server) error {
			_, err := testserver.HTTPGet(ctx, "http://"+s.HostPort(ProxyAPIPort)+"/version")
			return err
		},
	}
	s.start()
	p := &Proxy{s}
	// Creating the proxy returns once it listens.
	body, _ := json.Marshal(map[string]any{
		"name": "upstream", "listen": "0.0.0.0:20000", "upstream": upstream, "enabled": true,
	})
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+s.HostPort(ProxyAPIPort)+"/proxies", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := probeClient.Do(req)
	if err != nil {
		t.Fatalf("containers: toxiproxy: creating the proxy: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		t.Fatalf("containers: toxiproxy: creating the proxy: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return p
}

// Endpoint returns the proxy's address on the host, 127.0.0.1:port.
func (p *Proxy) Endpoint() string { return p.HostPort(ProxyPort) }
