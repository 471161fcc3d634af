package testserver

import (
	"context"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
)

// TestConsulCluster: 3 servers and a client agent become healthy; freezing
// the leader makes the other two elect another, which the client agent
// follows; the frozen server rejoins once resumed.
func TestConsulCluster(t *testing.T) {
	start := time.Now()
	c := StartConsulCluster(t, 3)
	t.Logf("3 servers and a client agent healthy in %v", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Freeze(leader)
	frozen := time.Now()
	next := -1
	testutil.WaitFor(t, 30*time.Second, "a new leader among the servers not frozen", func() bool {
		l, err := c.Leader(ctx)
		next = l
		return err == nil && l != leader
	})
	elected := time.Since(frozen)
	testutil.WaitFor(t, 30*time.Second, "the client agent to name the new leader", func() bool {
		i, err := c.leaderOf(ctx, c.Client)
		return err == nil && i == next
	})
	if err := c.WaitHealthy(ctx); err == nil {
		t.Error("WaitHealthy with a server frozen succeeded")
	}
	c.Thaw(leader)
	thawed := time.Now()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader %d frozen, %d elected after %v; healthy %v after the thaw", leader, next,
		elected.Round(time.Millisecond), time.Since(thawed).Round(time.Millisecond))
}
