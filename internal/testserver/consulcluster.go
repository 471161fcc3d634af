package testserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// ConsulCluster is a Consul datacenter as production runs it: several
// agents in server mode (bootstrap_expect, joined to each other over
// loopback) and one client agent joined to them, through which clients
// register and query, each a child process of the test on 127.0.0.1 with its
// data under t.TempDir() (Stop and Start keep the Raft log, the catalog and
// the agent's own registrations). Raft runs with raft_multiplier = 1, the
// production setting (election within a second or two); autopilot keeps
// every server as a voter (min_quorum = the number of servers), so a server
// that is stopped is not pruned and counts again once restarted. Each server
// has the controls of ConsulServer, as has the client agent (Client).
type ConsulCluster struct {
	t       testing.TB
	Servers []*ConsulServer
	// Client is the client agent (no server) joined to the servers. Its
	// Pause, Resume, Stop and Start freeze and restart the agent that
	// clients talk to.
	Client *ConsulServer
}

// StartConsulCluster starts servers Consul servers and a client agent, and
// waits until the cluster is healthy (see WaitHealthy). The processes are
// killed when the test ends.
func StartConsulCluster(t testing.TB, servers int) *ConsulCluster {
	t.Helper()
	bin, err := Binary("consul")
	if err != nil {
		t.Fatal(err)
	}
	if servers < 1 {
		t.Fatalf("testserver: consul cluster of %d servers", servers)
	}
	c := &ConsulCluster{t: t}
	for attempt := 1; ; attempt++ {
		err := c.start(bin, servers)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
			err = c.WaitHealthy(ctx)
			cancel()
		}
		if err == nil {
			return c
		}
		for _, s := range c.agents() {
			s.proc.kill()
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: consul cluster: %v; retrying on other ports", err)
			continue
		}
		for _, s := range c.agents() {
			s.proc.logTail(t)
		}
		t.Fatalf("testserver: consul cluster did not start: %v", err)
	}
}

func (c *ConsulCluster) agents() []*ConsulServer {
	all := append([]*ConsulServer(nil), c.Servers...)
	if c.Client != nil {
		all = append(all, c.Client)
	}
	return all
}

func (c *ConsulCluster) start(bin string, n int) error {
	ports, err := FreePorts(5 * (n + 1))
	if err != nil {
		return err
	}
	dir := c.t.TempDir()
	agent := func(i int, name string, opts ConsulServerOptions) *ConsulServer {
		p := ports[5*i:]
		s := &ConsulServer{
			t: c.t, opts: opts, dataDir: filepath.Join(dir, name),
			node: "rollcall-" + name + "-" + strconv.Itoa(p[0]), nodeID: randomNodeID(),
			http: p[0], serfL: p[1], serfW: p[2], server: p[3], https: p[4],
		}
		s.proc = newChild(c.t, "consul-"+name, bin, filepath.Join(dir, name+".log"))
		return s
	}
	c.Servers = make([]*ConsulServer, n)
	for i := range c.Servers {
		c.Servers[i] = agent(i, fmt.Sprintf("s%d", i), ConsulServerOptions{
			// Dead servers are not pruned from the Raft configuration: a
			// stopped server stays a voter and counts again once back.
			HCL: []string{fmt.Sprintf("autopilot { min_quorum = %d }", n)},
		})
	}
	for _, s := range c.Servers {
		s.servers = c.Servers
	}
	c.Client = agent(n, "client", ConsulServerOptions{Join: c.Servers[0]})
	c.Client.servers = c.Servers
	for _, s := range c.Servers {
		if err := s.launch(); err != nil {
			return err
		}
	}
	// A server knows a leader once a quorum of them runs: wait for all of
	// them together.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range c.Servers {
		wg.Go(func() { errs[i] = s.waitReady() })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return c.Client.start()
}

// ClientAddr returns the address of the client agent's HTTP API, host:port.
func (c *ConsulCluster) ClientAddr() string { return c.Client.Addr() }

// Leader returns the index of the server that leads: one that is running,
// not paused, and that a majority of all the servers, itself included, name
// as the leader (GET /v1/status/leader on each server that is running and
// not paused, each within a second at most). It may be called from any
// goroutine.
func (c *ConsulCluster) Leader(ctx context.Context) (int, error) {
	votes := make([]int, len(c.Servers))
	var errs []error
	for _, s := range c.Servers {
		if !s.answering() {
			continue
		}
		i, err := c.leaderOf(ctx, s)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.node, err))
			continue
		}
		votes[i]++
	}
	for i, v := range votes {
		if v > len(c.Servers)/2 && c.Servers[i].answering() {
			return i, nil
		}
	}
	return -1, fmt.Errorf("testserver: consul: no leader that a majority of the servers names (votes %v): %w", votes, errors.Join(errs...))
}

// answering reports whether the agent runs and is not paused.
func (s *ConsulServer) answering() bool { return s.proc.running() && !s.paused.Load() }

// leaderOf returns the index of the server that agent a names as the leader.
func (c *ConsulCluster) leaderOf(ctx context.Context, a *ConsulServer) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	body, err := a.get(ctx, "", "/v1/status/leader")
	if err != nil {
		return -1, err
	}
	var addr string
	if err := json.Unmarshal(body, &addr); err != nil {
		return -1, fmt.Errorf("/v1/status/leader: %w: %s", err, bytes.TrimSpace(body))
	}
	if addr == "" {
		return -1, errors.New("no leader known")
	}
	for i, s := range c.Servers {
		if addr == net.JoinHostPort("127.0.0.1", strconv.Itoa(s.server)) {
			return i, nil
		}
	}
	return -1, fmt.Errorf("leader %s is none of the servers", addr)
}

// Freeze pauses server i (SIGSTOP; see ConsulServer.Pause).
func (c *ConsulCluster) Freeze(i int) { c.Servers[i].Pause() }

// Thaw resumes server i.
func (c *ConsulCluster) Thaw(i int) { c.Servers[i].Resume() }

// Stop kills server i, keeping its data.
func (c *ConsulCluster) Stop(i int) { c.Servers[i].Stop() }

// Start starts server i again with its data and waits until it knows a
// leader.
func (c *ConsulCluster) Start(i int) { c.Servers[i].Start() }

// WaitHealthy waits, until ctx ends, for the cluster to be whole: every
// server answers and names the same leader, the Raft configuration has
// every server as a voter, the client agent names that leader too and sees
// every server alive in its member list. It fails at once if a server or the
// client agent is stopped or paused.
func (c *ConsulCluster) WaitHealthy(ctx context.Context) error {
	for _, a := range c.agents() {
		if !a.answering() {
			return fmt.Errorf("testserver: consul: %s is stopped or paused", a.node)
		}
	}
	var last error
	for {
		if last = c.healthy(ctx); last == nil {
			return nil
		}
		t := time.NewTimer(50 * time.Millisecond) // polling interval
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("testserver: consul cluster not healthy: %w (last: %v)", ctx.Err(), last)
		case <-t.C:
		}
	}
}

func (c *ConsulCluster) healthy(ctx context.Context) error {
	leader, err := c.Leader(ctx)
	if err != nil {
		return err
	}
	for _, s := range c.Servers {
		i, err := c.leaderOf(ctx, s)
		if err != nil {
			return fmt.Errorf("%s: %w", s.node, err)
		}
		if i != leader {
			return fmt.Errorf("%s names server %d as the leader, the others %d", s.node, i, leader)
		}
	}
	if i, err := c.leaderOf(ctx, c.Client); err != nil || i != leader {
		return fmt.Errorf("the client agent names server %d as the leader (%v), the servers %d", i, err, leader)
	}
	qctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	body, err := c.Client.get(qctx, "", "/v1/operator/raft/configuration")
	if err != nil {
		return err
	}
	var raft struct {
		Servers []struct {
			Address string
			Voter   bool
		}
	}
	if err := json.Unmarshal(body, &raft); err != nil {
		return fmt.Errorf("/v1/operator/raft/configuration: %w", err)
	}
	voters := map[string]bool{}
	for _, r := range raft.Servers {
		if r.Voter {
			voters[r.Address] = true
		}
	}
	body, err = c.Client.get(qctx, "", "/v1/agent/members")
	if err != nil {
		return err
	}
	var members []struct {
		Name   string
		Status int
	}
	if err := json.Unmarshal(body, &members); err != nil {
		return fmt.Errorf("/v1/agent/members: %w", err)
	}
	alive := map[string]bool{}
	for _, m := range members {
		alive[m.Name] = m.Status == 1 // serf's StatusAlive
	}
	for _, s := range c.Servers {
		if !voters[net.JoinHostPort("127.0.0.1", strconv.Itoa(s.server))] {
			return fmt.Errorf("%s is not a voter in the Raft configuration", s.node)
		}
		if !alive[s.node] {
			return fmt.Errorf("the client agent does not see %s alive", s.node)
		}
	}
	return nil
}
