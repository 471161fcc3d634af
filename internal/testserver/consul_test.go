package testserver

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/internal/testutil"
)

func TestConsulServerKeepsDataAcrossRestart(t *testing.T) {
	start := time.Now()
	c := StartConsulServer(t)
	t.Logf("consul server ready at %s in %v", c.Addr(), time.Since(start).Round(time.Millisecond))
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = c.Addr()
	cli, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cfg.Transport.CloseIdleConnections)
	reg := &api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.1"}
	if err := cli.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		t.Helper()
		services, _, err := cli.Catalog().Service("web", "", queryCtx(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		return len(services)
	}
	// The agent writes a registration to the catalog by its anti-entropy
	// sync, a moment after ServiceRegister returns: the catalog (the
	// server's raft data) is what must survive the restart.
	testutil.WaitFor(t, 10*time.Second, "web-1 in the catalog", func() bool { return count() == 1 })
	c.Pause()
	if _, _, err := cli.Catalog().Service("web", "", queryCtx(t, 300*time.Millisecond)); err == nil {
		t.Error("query to a paused agent succeeded")
	}
	c.Resume()
	c.Stop()
	c.Start()
	// The restarted server answers once it leads again; the catalog is read
	// from its data until it shows web-1 (a read before the leader has
	// applied its log may see less).
	testutil.WaitFor(t, 10*time.Second, "web-1 in the catalog after a restart", func() bool { return count() == 1 })
	c.Stop()
	c.Wipe()
	c.Start()
	if n := count(); n != 0 {
		t.Fatalf("after a wipe the catalog has %d instances of web, want 0", n)
	}
}

func queryCtx(t *testing.T, d time.Duration) *api.QueryOptions {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return (&api.QueryOptions{}).WithContext(ctx)
}
