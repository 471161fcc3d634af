package containers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/testcontainers/testcontainers-go"
)

// Ports of the Nacos test server in the container: Nacos' port, its gRPC
// port (+1000, which the SDK derives from the first) and the tests' control
// API.
const (
	NacosPort        = "8848/tcp"
	NacosGRPCPort    = "9848/tcp"
	NacosControlPort = "18848/tcp"
)

// Nacos is the project's Nacos 2.x protocol server (package nacosserver, as
// the command nacos-test-server) in a container, with the methods of
// nacosserver.Server that the harness uses. Pause, Stop and Start act on the
// container; the server keeps its data in memory, so a stopped server
// starts again empty (Restart(false) loses the injected instances that
// nacosserver.Server keeps). The gRPC port is published on the host port
// after Addr's + 1000, as the SDK expects.
type Nacos struct {
	*Server
}

// StartNacos starts the server (image Image("nacos"): there is no default;
// scripts/build-images.sh nacos-test-server builds it) and waits until it
// serves. The container is removed when the test ends.
//
// The official nacos/nacos-server image does not fit: the harness needs the
// test server's control API (inject instances, drop every connection, set
// the push delay).
func StartNacos(t testing.TB) *Nacos {
	t.Helper()
	img := Image("nacos")
	if img == "" {
		t.Fatalf("containers: %s is not set: it names the image of the project's Nacos test server, which "+
			"`scripts/build-images.sh --env nacos-test-server` builds and prints", Images["nacos"].Env)
	}
	s := &Server{
		t:     t,
		name:  "nacos-test-server",
		image: img,
		ports: []string{NacosPort, NacosGRPCPort, NacosControlPort},
		pickPorts: func() ([]int, error) {
			// P and P+1000 free, and one more.
			for range 50 {
				ports, err := testserver.FreePorts(2)
				if err != nil {
					return nil, err
				}
				if ports[0]+1000 > 65535 {
					continue
				}
				if l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]+1000))); err == nil {
					l.Close()
					return []int{ports[0], ports[0] + 1000, ports[1]}, nil
				}
			}
			return nil, fmt.Errorf("containers: no free pair of ports P, P+1000")
		},
		customize: func(s *Server) []testcontainers.ContainerCustomizer {
			return []testcontainers.ContainerCustomizer{
				testcontainers.WithEntrypoint("/nacos-test-server"),
				testcontainers.WithCmd("-port=8848", "-control-port=18848"),
			}
		},
		probe: func(ctx context.Context, s *Server) error {
			_, err := testserver.HTTPGet(ctx, "http://"+s.HostPort(NacosControlPort)+"/healthz")
			return err
		},
	}
	s.start()
	return &Nacos{s}
}

// Addr is the host:port to configure the SDK with; the SDK adds 1000 for gRPC.
func (n *Nacos) Addr() string { return n.HostPort(NacosPort) }

// SetPushDelay sets the server's merge window between a change and its push.
func (n *Nacos) SetPushDelay(d time.Duration) {
	n.t.Helper()
	n.control("push-delay?d="+url.QueryEscape(d.String()), nil)
}

// DropConnections closes every client transport, as a server crash would,
// and returns how many it closed.
func (n *Nacos) DropConnections() int {
	n.t.Helper()
	out := n.control("drop-connections", nil)
	c, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		n.t.Fatalf("containers: nacos: drop-connections answered %q", out)
	}
	return c
}

// Inject adds an instance that belongs to no connection, verbatim (see
// nacosserver.Server.Inject).
func (n *Nacos) Inject(namespace, group, service string, inst model.Instance) {
	n.t.Helper()
	body, err := json.Marshal(inst)
	if err != nil {
		n.t.Fatal(err)
	}
	q := url.Values{"namespace": {namespace}, "group": {group}, "service": {service}}
	n.control("inject?"+q.Encode(), body)
}

func (n *Nacos) control(path string, body []byte) string {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+n.HostPort(NacosControlPort)+"/"+path, bytes.NewReader(body))
	if err != nil {
		n.t.Fatal(err)
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		n.t.Fatalf("containers: nacos: %s: %v", path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode != http.StatusOK {
		n.t.Fatalf("containers: nacos: %s: %s: %s", path, resp.Status, bytes.TrimSpace(out))
	}
	return string(out)
}
