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

// Consul is a Consul agent in -dev mode (a single server that is its own
// leader) running as a child process of the test, on 127.0.0.1. Its HTTP,
// Serf LAN, Serf WAN and server RPC ports are chosen free at the first start
// and kept across restarts; DNS, gRPC and gRPC-TLS are disabled.
//
// A -dev agent keeps all its state in memory: Stop loses every registration,
// key and session, and Start brings up an empty agent (with the same node name
// and ID) on the same ports.
//
// Its methods call t.Fatal on failure, so call them from the test's goroutine.
type Consul struct {
	t      testing.TB
	node   string
	nodeID string
	http   int
	serfL  int
	serfW  int
	server int
	proc   *child
}

// StartConsul starts a -dev Consul agent and waits until it has a leader. The
// process is killed, and waited for, when the test ends.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	bin, err := Binary("consul")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &Consul{t: t, nodeID: newUUID()}
	c.proc = newChild(t, "consul", bin, filepath.Join(dir, "consul.log"))
	// A port found free can be taken by someone else before consul binds it:
	// on the first start only, retry with other ports.
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(4)
		if err != nil {
			t.Fatal(err)
		}
		c.http, c.serfL, c.serfW, c.server = ports[0], ports[1], ports[2], ports[3]
		c.node = "rollcall-test-" + strconv.Itoa(c.http)
		err = c.start()
		if err == nil {
			return c
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: consul: %v; retrying on other ports", err)
			continue
		}
		c.proc.logTail(t)
		t.Fatalf("testserver: consul did not start: %v", err)
	}
}

// Addr returns the address of the HTTP API, host:port (for
// github.com/hashicorp/consul/api's Config.Address).
func (c *Consul) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(c.http))
}

// Pause stops the process with SIGSTOP: connections stay open, nothing answers.
// A request without a timeout to a paused agent waits until Resume.
func (c *Consul) Pause() {
	c.t.Helper()
	if err := c.proc.signal(syscall.SIGSTOP); err != nil {
		c.t.Fatalf("testserver: consul: pause: %v", err)
	}
}

// Resume continues a paused process with SIGCONT.
func (c *Consul) Resume() {
	c.t.Helper()
	if err := c.proc.signal(syscall.SIGCONT); err != nil {
		c.t.Fatalf("testserver: consul: resume: %v", err)
	}
}

// Stop kills the process with SIGKILL and waits for it to exit. All state is
// lost: a -dev agent keeps none on disk.
func (c *Consul) Stop() {
	c.t.Helper()
	if !c.proc.kill() {
		c.t.Fatal("testserver: consul: Stop: not running")
	}
}

// Start starts a stopped agent again, empty, on the same ports, and waits
// until it has a leader.
func (c *Consul) Start() {
	c.t.Helper()
	if err := c.start(); err != nil {
		c.proc.logTail(c.t)
		c.t.Fatalf("testserver: consul did not start: %v", err)
	}
}

func (c *Consul) start() error {
	args := []string{
		"agent", "-dev",
		"-node=" + c.node,
		"-node-id=" + c.nodeID,
		"-bind=127.0.0.1",
		"-client=127.0.0.1",
		"-http-port=" + strconv.Itoa(c.http),
		"-serf-lan-port=" + strconv.Itoa(c.serfL),
		"-serf-wan-port=" + strconv.Itoa(c.serfW),
		"-server-port=" + strconv.Itoa(c.server),
		"-dns-port=-1",
		"-grpc-port=-1",
		"-grpc-tls-port=-1", // otherwise -dev binds 8503
	}
	env := filterEnv(os.Environ(), "CONSUL_")
	if err := c.proc.start(args, env); err != nil {
		return err
	}
	leader := "http://" + c.Addr() + "/v1/status/leader"
	return c.proc.waitReady(func(ctx context.Context) error {
		body, err := httpGet(ctx, leader)
		if err != nil {
			return err
		}
		// The body is a JSON string: "" until there is a leader.
		if b := bytes.TrimSpace(body); len(b) < 3 || b[0] != '"' {
			return fmt.Errorf("no leader yet: %s", b)
		}
		return nil
	})
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
