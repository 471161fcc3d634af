package testserver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EtcdCluster is an etcd cluster of several members, each a child process of
// the test listening on 127.0.0.1, bootstrapped statically, with the
// heartbeat and election timing of a production cluster on a LAN (100 ms and
// 1 s). Each member has the controls of Etcd (Pause freezes one member while
// the others keep quorum; Stop and Start restart it with its data). Wipe of a
// single member is not supported: it could not rejoin.
type EtcdCluster struct {
	t       testing.TB
	Members []*Etcd
}

// StartEtcdCluster starts an n-member cluster and waits until every member
// serves requests. The processes are killed when the test ends.
func StartEtcdCluster(t testing.TB, n int) *EtcdCluster {
	t.Helper()
	bin, err := Binary("etcd")
	if err != nil {
		t.Fatal(err)
	}
	c := &EtcdCluster{t: t}
	for attempt := 1; ; attempt++ {
		err := c.start(bin, n)
		if err == nil {
			return c
		}
		for _, m := range c.Members {
			m.proc.kill()
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: etcd cluster: %v; retrying on other ports", err)
			continue
		}
		for _, m := range c.Members {
			m.proc.logTail(t)
		}
		t.Fatalf("testserver: etcd cluster did not start: %v", err)
	}
}

func (c *EtcdCluster) start(bin string, n int) error {
	ports, err := FreePorts(2 * n)
	if err != nil {
		return err
	}
	dir := c.t.TempDir()
	c.Members = make([]*Etcd, n)
	var initial []string
	for i := range c.Members {
		name := fmt.Sprintf("m%d", i)
		m := &Etcd{
			t:       c.t,
			dataDir: filepath.Join(dir, name),
			client:  ports[2*i],
			peer:    ports[2*i+1],
			name:    name,
			timing:  []string{"--heartbeat-interval=100", "--election-timeout=1000"},
		}
		m.proc = newChild(c.t, "etcd-"+name, bin, filepath.Join(dir, name+".log"))
		c.Members[i] = m
		initial = append(initial, name+"="+m.peerURL())
	}
	for _, m := range c.Members {
		m.cluster = strings.Join(initial, ",")
		if err := m.launch(); err != nil {
			return err
		}
	}
	// A member is healthy once the cluster has elected a leader, which
	// needs a quorum of members running: wait for all of them together.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, m := range c.Members {
		wg.Go(func() { errs[i] = m.waitReady() })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Endpoints returns every member's client address, host:port.
func (c *EtcdCluster) Endpoints() []string {
	var eps []string
	for _, m := range c.Members {
		eps = append(eps, m.Endpoint())
	}
	return eps
}

// Leader returns the index of the member that is the leader, asking the
// members that are not paused (each within 2 s). It may be called from any
// goroutine.
func (c *EtcdCluster) Leader() (int, error) {
	ids := map[uint64]int{}
	var leader uint64
	var errs []error
	for i, m := range c.Members {
		if m.paused.Load() {
			continue
		}
		id, lead, err := memberStatus(m.Endpoint())
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.name, err))
			continue
		}
		ids[id] = i
		if lead != 0 {
			leader = lead
		}
	}
	if i, ok := ids[leader]; ok && leader != 0 {
		return i, nil
	}
	return -1, fmt.Errorf("testserver: no leader among the members that answered: %w", errors.Join(errs...))
}

// memberStatus asks one member for its ID and the leader it knows.
func memberStatus(ep string) (id, leader uint64, err error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return 0, 0, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := cli.Status(ctx, ep)
	if err != nil {
		return 0, 0, err
	}
	return st.Header.MemberId, st.Leader, nil
}

// WaitHealthy waits until every member reports itself healthy, within the
// time a member may take to become ready.
func (c *EtcdCluster) WaitHealthy() {
	c.t.Helper()
	for _, m := range c.Members {
		if err := m.waitReady(); err != nil {
			c.t.Fatalf("testserver: etcd member %s: %v", m.name, err)
		}
	}
}
