package consul

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Tests of the driver contract (registry/driver) on the backend itself,
// against a real agent: what the shared layer relies on.

func liveBackend(t *testing.T, addr string, o Options) *backend {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	cli, err := api.NewClient(&api.Config{Address: addr, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	b := newBackend(cli, &o)
	t.Cleanup(func() { _ = b.Close(); tr.CloseIdleConnections() })
	return b
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// agentHas reports whether the agent has the service ID, asked by another
// client.
func agentHas(t *testing.T, admin *api.Client, sid string) bool {
	t.Helper()
	svc, _, err := admin.Agent().Service(sid, (&api.QueryOptions{}).WithContext(ctxFor(t, 10*time.Second)))
	if isStatus(err, http.StatusNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return svc != nil
}

func adminOf(t *testing.T, addr string) *api.Client {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	t.Cleanup(tr.CloseIdleConnections)
	cli, err := api.NewClient(&api.Config{Address: addr, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	return cli
}

// Withdraw that failed (the agent paused) is repeated once it is back, and
// the repeat removes the instance. Update is bounded by its ctx.
func TestWithdrawIsSafeToRepeatAndUpdateIsBounded(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	b := liveBackend(t, srv.Addr(), Options{TTL: 3 * time.Second})
	admin := adminOf(t, srv.Addr())
	inst := driver.Instance{Service: "wd", ID: "a", Addr: "127.0.0.1:9001"}
	pub, err := b.Publish(ctxFor(t, 10*time.Second), inst)
	if err != nil {
		t.Fatal(err)
	}
	const sid = "wd~a"
	if !agentHas(t, admin, sid) {
		t.Fatal("published instance not on the agent")
	}

	srv.Pause()
	start := time.Now()
	inst.Metadata = map[string]string{"v": "2"}
	err = pub.Update(ctxFor(t, 500*time.Millisecond), inst)
	took := time.Since(start)
	t.Logf("Update with a 500ms ctx, agent paused: %v after %v", err, took.Round(time.Millisecond))
	if err == nil {
		t.Error("Update succeeded with the agent paused")
	}
	if took > 5*time.Second { // far beyond its ctx: not bounded by it
		t.Errorf("Update took %v with a 500ms ctx", took)
	}
	err = pub.Withdraw(ctxFor(t, 500*time.Millisecond))
	t.Logf("Withdraw with a 500ms ctx, agent paused: %v", err)
	if err == nil {
		t.Fatal("Withdraw succeeded with the agent paused")
	}
	srv.Resume()
	if err := pub.Withdraw(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatalf("repeated Withdraw: %v", err)
	}
	if agentHas(t, admin, sid) {
		t.Fatal("the repeated Withdraw returned nil but the instance is still on the agent")
	}
	if err := pub.Withdraw(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatalf("Withdraw once more: %v", err)
	}
}

// Watch's ctx bounds opening only: the stream outlives it and delivers
// later changes.
func TestWatchOutlivesItsContext(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	b := liveBackend(t, srv.Addr(), Options{TTL: 3 * time.Second, WaitTime: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	st, err := b.Watch(ctx, "wctx")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ev, err := st.Next(ctxFor(t, 10*time.Second))
	if err != nil || !ev.Reset || len(ev.Instances) != 0 {
		t.Fatalf("first event after the open ctx ended: %+v, %v", ev, err)
	}
	if _, err := b.Publish(ctxFor(t, 10*time.Second), driver.Instance{Service: "wctx", ID: "a", Addr: "127.0.0.1:9001"}); err != nil {
		t.Fatal(err)
	}
	ev, err = st.Next(ctxFor(t, 10*time.Second))
	if err != nil || len(ev.Instances) != 1 {
		t.Fatalf("the change after the open ctx ended: %+v, %v", ev, err)
	}
	st.Close()
	if _, err := st.Next(ctxFor(t, 10*time.Second)); err == nil {
		t.Error("Next after Close succeeded")
	}
}

// A renewal that fails is retried before the next one is due: a paused
// agent finds a renewal waiting when it resumes, and the session passes
// again within moments, without being lost.
func TestRenewalIsInFlightWhenTheAgentResumes(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const ttl = 1500 * time.Millisecond
	b := liveBackend(t, srv.Addr(), Options{TTL: ttl})
	admin := adminOf(t, srv.Addr())
	pub, err := b.Publish(ctxFor(t, 10*time.Second), driver.Instance{Service: "rn", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	cid := b.sess.cid
	b.mu.Unlock()
	srv.Pause()
	time.Sleep(3 * ttl) // the outage being simulated
	srv.Resume()
	resumed := time.Now()
	var critical bool
	testutil.WaitFor(t, 20*time.Second, "the session check passing", func() bool {
		checks, err := admin.Agent().ChecksWithFilterOpts(`Type == "ttl"`, (&api.QueryOptions{}).WithContext(ctxFor(t, 5*time.Second)))
		if err != nil {
			return false
		}
		c := checks[cid]
		if c != nil && c.Status == api.HealthCritical {
			critical = true
		}
		return c != nil && c.Status == api.HealthPassing
	})
	t.Logf("session check passing %v after the resume (seen critical first: %v)", time.Since(resumed).Round(time.Millisecond), critical)
	select {
	case <-pub.Lost():
		t.Errorf("the publication was lost (%v): the renewal should have renewed it", pub.Err())
	default:
	}
	if errors.Is(pub.Err(), registry.ErrUnavailable) {
		t.Errorf("publication error %v", pub.Err())
	}
}
