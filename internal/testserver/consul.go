package testserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ConsulServer is a Consul agent in server mode that bootstraps a
// single-server cluster, running as a child process of the test on 127.0.0.1,
// with its state in a data directory under t.TempDir() (unless Dev is set):
// unlike a -dev agent, Stop and Start keep the catalog (Raft) and the agent's own
// service and check registrations, as a production agent restarting does, and
// Wipe removes them. Ports are chosen free at the first start and kept across
// restarts; DNS, gRPC and gRPC-TLS are disabled. With
// ConsulServerOptions.Join it is a client agent of another one's cluster
// instead (a second node), and with ConsulServerOptions.ACL it enforces ACLs.
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
	token   string // the management token, with ACL
	proc    *child

	// Of an agent of a ConsulCluster: the cluster's servers, which it
	// retry-joins; a server among them bootstraps once all of them are up
	// (bootstrap_expect).
	servers []*ConsulServer
	paused  atomic.Bool // between Pause and Resume
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
	// ACL enables ACLs with the default policy deny; ManagementToken is the
	// initial management token, which the agent uses too. Start waits until
	// the token works.
	ACL bool
	// Join, when set, makes this agent a client agent (another node, no
	// server) joined to Join's cluster; Start waits until it is in the
	// catalog. Not with ACL or Dev.
	Join *ConsulServer
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
	if opts.Join != nil && (opts.ACL || opts.Dev || opts.Join.opts.ACL) {
		t.Fatal("testserver: consul: Join goes with neither ACL nor Dev")
	}
	dir := t.TempDir()
	c := &ConsulServer{t: t, opts: opts, dataDir: filepath.Join(dir, "data"), nodeID: randomNodeID()}
	if opts.ACL {
		c.token = randomNodeID() // a UUID, as Consul wants
	}
	c.proc = newChild(t, "consul", bin, filepath.Join(dir, "consul.log"))
	for attempt := 1; ; attempt++ {
		ports, err := FreePorts(5)
		if err != nil {
			t.Fatal(err)
		}
		c.http, c.serfL, c.serfW, c.server, c.https = ports[0], ports[1], ports[2], ports[3], ports[4]
		c.node = "rollcall-test-" + strconv.Itoa(c.http)
		if opts.Join != nil {
			c.node = "rollcall-client-" + strconv.Itoa(c.http)
		}
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

// Node returns the agent's node name.
func (c *ConsulServer) Node() string { return c.node }

// ManagementToken returns the initial management token; only with
// ConsulServerOptions.ACL.
func (c *ConsulServer) ManagementToken() string {
	if !c.opts.ACL {
		c.t.Fatal("testserver: consul: ManagementToken without ConsulServerOptions.ACL")
	}
	return c.token
}

// NewToken creates, with the management token, an ACL policy holding rules
// (HCL, e.g. `key_prefix "x/" { policy = "read" }`) and a token linked to it,
// and returns the token's secret. Only with ConsulServerOptions.ACL.
func (c *ConsulServer) NewToken(name, rules string) string {
	c.t.Helper()
	mgmt := c.ManagementToken()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var policy struct{ ID string }
	if err := c.put(ctx, mgmt, "/v1/acl/policy", map[string]string{"Name": name, "Rules": rules}, &policy); err != nil {
		c.t.Fatalf("testserver: consul: creating policy %s: %v", name, err)
	}
	var token struct{ SecretID string }
	body := map[string]any{"Description": name, "Policies": []map[string]string{{"ID": policy.ID}}}
	if err := c.put(ctx, mgmt, "/v1/acl/token", body, &token); err != nil {
		c.t.Fatalf("testserver: consul: creating token %s: %v", name, err)
	}
	return token.SecretID
}

// put sends a JSON PUT to the HTTP API with token and decodes the answer
// into out.
func (c *ConsulServer) put(ctx context.Context, token, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://"+c.Addr()+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("X-Consul-Token", token)
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return json.Unmarshal(body, out)
}

// get sends a GET to the HTTP API with token.
func (c *ConsulServer) get(ctx context.Context, token, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Addr()+path, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("X-Consul-Token", token)
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
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
	c.paused.Store(true)
}

// Resume continues a paused process with SIGCONT.
func (c *ConsulServer) Resume() {
	c.t.Helper()
	if err := c.proc.signal(syscall.SIGCONT); err != nil {
		c.t.Fatalf("testserver: consul: resume: %v", err)
	}
	c.paused.Store(false)
}

// Stop kills the process with SIGKILL and waits for it to exit. The data
// directory is kept.
func (c *ConsulServer) Stop() {
	c.t.Helper()
	if !c.proc.kill() {
		c.t.Fatal("testserver: consul: Stop: not running")
	}
	c.paused.Store(false)
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
	if err := c.launch(); err != nil {
		return err
	}
	return c.waitReady()
}

// launch starts the process.
func (c *ConsulServer) launch() error {
	args := []string{"agent", "-server", "-bootstrap", "-data-dir=" + c.dataDir}
	switch {
	case c.opts.Dev:
		args = []string{"agent", "-dev"}
	case c.opts.Join != nil:
		args = []string{"agent", "-data-dir=" + c.dataDir, "-retry-interval=200ms"}
		join := c.servers
		if len(join) == 0 {
			join = []*ConsulServer{c.opts.Join}
		}
		for _, s := range join {
			args = append(args, "-retry-join=127.0.0.1:"+strconv.Itoa(s.serfL))
		}
	case len(c.servers) > 0: // a server of a ConsulCluster
		args = []string{"agent", "-server", "-bootstrap-expect=" + strconv.Itoa(len(c.servers)),
			"-data-dir=" + c.dataDir, "-retry-interval=200ms"}
		for _, s := range c.servers {
			if s != c {
				args = append(args, "-retry-join=127.0.0.1:"+strconv.Itoa(s.serfL))
			}
		}
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
	if c.opts.ACL {
		args = append(args, fmt.Sprintf(`-hcl=acl { enabled = true default_policy = "deny" tokens { initial_management = %q agent = %q } }`, c.token, c.token))
	}
	for _, h := range c.opts.HCL {
		args = append(args, "-hcl="+h)
	}
	env := filterEnv(os.Environ(), "CONSUL_")
	return c.proc.start(args, env)
}

// waitReady waits until the agent knows a leader (and, per options, its
// token works or it is in the catalog).
func (c *ConsulServer) waitReady() error {
	return c.proc.waitReady(func(ctx context.Context) error {
		body, err := c.get(ctx, "", "/v1/status/leader")
		if err != nil {
			return err
		}
		if b := bytes.TrimSpace(body); len(b) < 3 || b[0] != '"' {
			return fmt.Errorf("no leader yet: %s", b)
		}
		if c.opts.ACL {
			// The leader creates the management token once elected.
			if _, err := c.get(ctx, c.token, "/v1/acl/token/self"); err != nil {
				return fmt.Errorf("management token not ready: %w", err)
			}
		}
		if c.opts.Join != nil {
			// In the catalog: its registrations can be synced.
			body, err := c.get(ctx, "", "/v1/catalog/node/"+c.node)
			if err != nil {
				return err
			}
			if bytes.Equal(bytes.TrimSpace(body), []byte("null")) {
				return fmt.Errorf("node %s not in the catalog yet", c.node)
			}
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
