package testserver

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func newConsulClient(t *testing.T, c *Consul) *api.Client {
	t.Helper()
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = c.Addr()
	cli, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// No idle connection may outlive the test (goleak).
	t.Cleanup(cfg.Transport.CloseIdleConnections)
	return cli
}

func consulCtx(t *testing.T, d time.Duration) *api.QueryOptions {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return (&api.QueryOptions{}).WithContext(ctx)
}

func consulWriteCtx(t *testing.T, d time.Duration) *api.WriteOptions {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return (&api.WriteOptions{}).WithContext(ctx)
}

func TestConsul(t *testing.T) {
	start := time.Now()
	c := StartConsul(t)
	t.Logf("consul ready at %s in %v", c.Addr(), time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(c.Addr(), "127.0.0.1:") {
		t.Errorf("Addr() = %q, want 127.0.0.1:port", c.Addr())
	}
	cli := newConsulClient(t, c)

	leader, err := cli.Status().Leader()
	if err != nil || leader == "" {
		t.Fatalf("leader = %q, %v", leader, err)
	}

	if _, err := cli.KV().Put(&api.KVPair{Key: "k", Value: []byte("v1")}, consulWriteCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	reg := &api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.1"}
	if err := cli.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	services, _, err := cli.Catalog().Service("web", "", consulCtx(t, 10*time.Second))
	if err != nil || len(services) != 1 || services[0].ServiceID != "web-1" {
		t.Fatalf("catalog service web = %v, %v; want web-1", services, err)
	}

	t.Run("pause", func(t *testing.T) {
		c.Pause()
		_, _, err := cli.KV().Get("k", consulCtx(t, 300*time.Millisecond))
		if err == nil {
			t.Error("get from a paused agent succeeded")
		}
		c.Resume()
		kv, _, err := cli.KV().Get("k", consulCtx(t, 10*time.Second))
		if err != nil || kv == nil || string(kv.Value) != "v1" {
			t.Errorf("get k after resume = %v, %v; want v1", kv, err)
		}
	})

	t.Run("stop start loses state", func(t *testing.T) {
		c.Stop()
		if _, _, err := cli.KV().Get("k", consulCtx(t, 300*time.Millisecond)); err == nil {
			t.Error("get from a stopped agent succeeded")
		}
		c.Start()
		kv, _, err := cli.KV().Get("k", consulCtx(t, 10*time.Second))
		if err != nil || kv != nil {
			t.Errorf("get k after restart = %v, %v; want nothing", kv, err)
		}
		services, _, err := cli.Catalog().Service("web", "", consulCtx(t, 10*time.Second))
		if err != nil || len(services) != 0 {
			t.Errorf("catalog service web after restart = %v, %v; want none", services, err)
		}
		if _, err := cli.KV().Put(&api.KVPair{Key: "k", Value: []byte("v2")}, consulWriteCtx(t, 10*time.Second)); err != nil {
			t.Errorf("put after restart: %v", err)
		}
	})
}
