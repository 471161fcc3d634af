package nacos_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/registry"
)

// TestSlowPushesResendOncePerGrace: when the server's push comes later
// than the redo grace (1.5 s), each waiting Register used to resend the
// whole service's set, so N concurrent Registers made N resends of N
// instances (issue 11 item 10: 200 forced resends and ~53,000 instance
// writes for 200 instances). A service is resent at most once per grace,
// whatever the number of waiters; the writes are counted on the server.
func TestSlowPushesResendOncePerGrace(t *testing.T) {
	srv := startServer(t)
	srv.SetPushDelay(4 * time.Second)
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), nil)
	const n = 40
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			_, err := r.Register(ctx, registry.Instance{Service: "storm", ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 7000+i)})
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		t.Errorf("Register: %v", err)
	}
	w := srv.Writes("", "", "storm")
	// A resend is a request that leaves the connection's publication as it
	// was: at most one per grace of the time taken, and one more.
	allowed := int(elapsed/(1500*time.Millisecond)) + 1
	t.Logf("%d Registers in %v: %d register requests carrying %d instances, %d of them resends (at most %d allowed)",
		n, elapsed.Round(time.Millisecond), w.Requests, w.Instances, w.Unchanged, allowed)
	if w.Unchanged > allowed {
		t.Errorf("%d resends of the service's set for %d Registers in %v; want at most %d (one per redo grace)", w.Unchanged, n, elapsed.Round(time.Millisecond), allowed)
	}
}
