package grpcresolver_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRollingRestartDropsNoCall replaces 3 servers one by one, each shut
// down in the documented order (Registration.Drain, then GracefulStop, then
// Close of its Registry), while two clients call steadily through the
// resolver on a real etcd: no call fails.
func TestRollingRestartDropsNoCall(t *testing.T) {
	e := newEtcdEnv(t)
	const ttl = 5 * time.Second
	servers := startServers(t, e, "rolling", ttl, 3)
	conn := dial(t, e.URL()+"/rolling")
	waitAllServing(t, conn, servers)

	var calls, failed atomic.Int64
	var mu sync.Mutex
	var failures []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if _, err := call(context.Background(), conn); err != nil {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, err.Error())
					mu.Unlock()
				}
				time.Sleep(2 * time.Millisecond) // the call rate: a few hundred a second
			}
		})
	}
	for i, old := range servers {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		start := time.Now()
		if err := old.rr.Drain(ctx, 0); err != nil {
			t.Errorf("Drain of %s: %v", old.id, err)
		}
		cancel()
		t.Logf("%s drained in %v", old.id, time.Since(start).Round(time.Millisecond))
		old.srv.GracefulStop()
		old.stop()
		if err := old.reg.Close(); err != nil {
			t.Errorf("Close of %s's registry: %v", old.id, err)
		}
		repl := startServer(t, e, "rolling", fmt.Sprintf("server-%d-new", i+1), ttl, nil)
		waitFor(t, 10*time.Second, repl.id+" answering", func() bool {
			for range 20 {
				if addr, err := call(context.Background(), conn); err == nil && addr == repl.addr {
					return true
				}
			}
			return false
		})
	}
	close(stop)
	wg.Wait()
	t.Logf("%d calls, %d failed", calls.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Fatalf("%d of %d calls failed during the rolling restart: %v", failed.Load(), calls.Load(), failures)
	}
	if calls.Load() < 100 {
		t.Fatalf("only %d calls were made", calls.Load())
	}
}
