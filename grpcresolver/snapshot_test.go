package grpcresolver_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
)

// A client that starts while etcd is stopped dials from the snapshot an
// earlier client wrote (snapshot=DIR in the target): its calls succeed, and
// keep succeeding once etcd is back. Before snapshots, such a client had no
// address until etcd answered (TestResolverReportsErrorOnlyWhileNothingIsKnown).
func TestColdStartWhileEtcdStoppedCallsFromTheSnapshot(t *testing.T) {
	e := newEtcdEnv(t)
	// The lease outlives the outage: the instance is alive throughout.
	s := startServer(t, e, "echo", "server-1", 30*time.Second, nil)
	dir := t.TempDir()
	target := e.URL() + "/echo?snapshot=" + dir + "&snapshot_wait=200ms"

	first := dial(t, target)
	if addr, err := call(context.Background(), first); err != nil || addr != s.addr {
		t.Fatalf("call through etcd: %s, %v; want %s", addr, err, s.addr)
	}
	testutil.WaitFor(t, 10*time.Second, "the snapshot file", func() bool {
		m, _ := filepath.Glob(filepath.Join(dir, "rollcall-*.json"))
		return len(m) == 1
	})
	_ = first.Close()

	e.Stop(t)
	// A new client (a restarted process): nothing in memory but the file.
	second := dial(t, target)
	for i := range 5 {
		addr, err := call(context.Background(), second)
		if err != nil || addr != s.addr {
			t.Fatalf("call %d with etcd stopped: %s, %v; want %s from the snapshot", i+1, addr, err, s.addr)
		}
	}
	e.Start(t)
	for i := range 5 {
		if addr, err := call(context.Background(), second); err != nil || addr != s.addr {
			t.Fatalf("call %d after etcd is back: %s, %v", i+1, addr, err)
		}
	}
}
