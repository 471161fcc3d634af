package testserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// ConsulServer is a Consul agent in server mode that bootstraps a
// single-server cluster, running as a child process of the test on 127.0.0.1,
// with its state in a data directory under t.TempDir() (unless Dev is set):
// unlike a -dev agent, Stop and Start keep the catalog (Raft) and the agent's own
// service and check registrations, as a production agent restarting does, and
// Wipe removes them. Ports are chosen free at the first start and kept across
// restarts; DNS, gRPC and gRPC-TLS are disabled.
//
// Its methods call t.Fatal on failure, so call them from the test's goroutine.
type ConsulServer struct {
	t       testing.TB
	opts    ConsulServerOptions
	dataDir string
	node    string
	nodeID  string
	http    int
	https   int
	serfL   int
	serfW   int
	server  int
	proc    *child
}

// ConsulServerOptions configure StartConsulServerWith.
type ConsulServerOptions struct {
	// HCL holds extra agent configuration, one fragment per -hcl flag, e.g.
	// `acl { enabled = true ... }` or `tls { defaults { ... } }`.
	HCL []string
	// HTTPS also opens an HTTPS API port (HTTPSAddr); the TLS files must be
	// configured through HCL (tls { defaults { ca_file, cert_file, key_file } }).
	HTTPS bool
	// Dev runs the agent with -dev instead: state in memory (no fsync),
	// lost by Stop.
	Dev bool
}

// StartConsulServer starts a persistent single-server Consul agent and waits
// until it has a leader. The process is killed, and waited for, when the test
// ends.
func StartConsulServer(t testing.TB) *ConsulServer {
	t.Helper()
	return StartConsulServerWith(t, ConsulServerOptions{})
}

// StartConsulServerWith is StartConsulServer with extra configuration. The
// readiness probe uses the plain HTTP port, which stays open.
func StartConsulServerWith(t testing.TB, opts ConsulServerOptions) *ConsulServer {
	t.Helper()
	bin, err := Binary("consul")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &ConsulServer{t: t, opts: opts, dataDir: filepath.Join(dir, "data"), nodeID: randomNodeID()}
	c.proc = newChild(t, "consul", bin, filepath.Join(dir, "consul.log"))
	for attempt := 1; ; attempt++ {
		ports, err := FreePorts(5)
		if err != nil {
			t.Fatal(err)
		}
		c.http, c.serfL, c.serfW, c.server, c.https = ports[0], ports[1], ports[2], ports[3], ports[4]
		c.node = "rollcall-test-" + strconv.Itoa(c.http)
		err = c.start()
		if err == nil {
			return c
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: consul: %v; retrying on other ports", err)
			_ = os.RemoveAll(c.dataDir)
			continue
		}
		c.proc.logTail(t)
		t.Fatalf("testserver: consul did not start: %v", err)
	}
}

// Addr returns the address of the HTTP API, host:port.
func (c *ConsulServer) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(c.http))
}

// HTTPSAddr returns the address of the HTTPS API, host:port; only with
// ConsulServerOptions.HTTPS.
func (c *ConsulServer) HTTPSAddr() string {
	if !c.opts.HTTPS {
		c.t.Fatal("testserver: consul: HTTPSAddr without ConsulServerOptions.HTTPS")
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(c.https))
}

// Pause stops the process with SIGSTOP: connections stay open, nothing answers.
func (c *ConsulServer) Pause() {
	c.t.Helper()
	if err := c.proc.signal(syscall.SIGSTOP); err != nil {
		c.t.Fatalf("testserver: consul: pause: %v", err)
	}
}

// Resume continues a paused process with SIGCONT.
func (c *ConsulServer) Resume() {
	c.t.Helper()
	if err := c.proc.signal(syscall.SIGCONT); err != nil {
		c.t.Fatalf("testserver: consul: resume: %v", err)
	}
}

// Stop kills the process with SIGKILL and waits for it to exit. The data
// directory is kept.
func (c *ConsulServer) Stop() {
	c.t.Helper()
	if !c.proc.kill() {
		c.t.Fatal("testserver: consul: Stop: not running")
	}
}

// Wipe removes the data directory of a stopped agent, so that the next Start
// begins with an empty cluster.
func (c *ConsulServer) Wipe() {
	c.t.Helper()
	if c.proc.running() {
		c.t.Fatal("testserver: consul: Wipe while running; Stop first")
	}
	if err := os.RemoveAll(c.dataDir); err != nil {
		c.t.Fatalf("testserver: consul: wipe: %v", err)
	}
}

// Start starts a stopped agent again on the same ports and data directory,
// and waits until it has a leader.
func (c *ConsulServer) Start() {
	c.t.Helper()
	if err := c.start(); err != nil {
		c.proc.logTail(c.t)
		c.t.Fatalf("testserver: consul did not start: %v", err)
	}
}

func (c *ConsulServer) start() error {
	args := []string{"agent", "-server", "-bootstrap", "-data-dir=" + c.dataDir}
	if c.opts.Dev {
		args = []string{"agent", "-dev"}
	}
	args = append(args,
		"-node="+c.node,
		"-node-id="+c.nodeID,
		"-bind=127.0.0.1",
		"-client=127.0.0.1",
		"-http-port="+strconv.Itoa(c.http),
		"-serf-lan-port="+strconv.Itoa(c.serfL),
		"-serf-wan-port="+strconv.Itoa(c.serfW),
		"-server-port="+strconv.Itoa(c.server),
		"-dns-port=-1",
		"-grpc-port=-1",
		"-grpc-tls-port=-1", // otherwise -dev binds 8503
		"-log-level=info",
		// Raft timings of -dev: a single server elects itself in well
		// under a second.
		"-hcl=performance { raft_multiplier = 1 }",
		"-hcl=disable_update_check = true",
	)
	if c.opts.HTTPS {
		args = append(args, "-https-port="+strconv.Itoa(c.https))
	}
	for _, h := range c.opts.HCL {
		args = append(args, "-hcl="+h)
	}
	env := filterEnv(os.Environ(), "CONSUL_")
	if err := c.proc.start(args, env); err != nil {
		return err
	}
	leader := "http://" + c.Addr() + "/v1/status/leader"
	return c.proc.waitReady(func(ctx context.Context) error {
		body, err := HTTPGet(ctx, leader)
		if err != nil {
			return err
		}
		if b := bytes.TrimSpace(body); len(b) < 3 || b[0] != '"' {
			return fmt.Errorf("no leader yet: %s", b)
		}
		return nil
	})
}

// randomNodeID returns a random (version 4) UUID for -node-id.
func randomNodeID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
