package registry_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// collected reads every metric through the SDK's manual reader.
func collected(t *testing.T, rd *sdkmetric.ManualReader) map[string]metricdata.Aggregation {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := rd.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]metricdata.Aggregation{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m.Data
		}
	}
	return out
}

// value returns the sum of the int64 gauge or counter points of name whose
// attributes include every one of want.
func value(t *testing.T, got map[string]metricdata.Aggregation, name string, want ...attribute.KeyValue) int64 {
	t.Helper()
	var pts []metricdata.DataPoint[int64]
	switch d := got[name].(type) {
	case metricdata.Gauge[int64]:
		pts = d.DataPoints
	case metricdata.Sum[int64]:
		pts = d.DataPoints
	case nil:
		return 0
	default:
		t.Fatalf("%s is a %T", name, d)
	}
	var n int64
	for _, p := range pts {
		if hasAll(p.Attributes, want) {
			n += p.Value
		}
	}
	return n
}

// samples returns the number of recordings of the histogram name whose
// attributes include every one of want.
func samples(t *testing.T, got map[string]metricdata.Aggregation, name string, want ...attribute.KeyValue) uint64 {
	t.Helper()
	h, ok := got[name].(metricdata.Histogram[float64])
	if !ok {
		return 0
	}
	var n uint64
	for _, p := range h.DataPoints {
		if hasAll(p.Attributes, want) {
			n += p.Count
		}
	}
	return n
}

func hasAll(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// The metrics during an outage, read through the OpenTelemetry SDK: the
// watcher is counted stale while the server is paused and its stale period
// recorded once it is fresh again; a Deregister during the outage counts its
// failed withdrawals; calls are recorded by operation, the failed ones with
// their error.type; registrations are counted by state.
func TestMetricsDuringAnOutage(t *testing.T) {
	rd := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(rd))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	srv := memory.NewServer()
	r := memory.New(srv, &memory.Options{TTL: time.Hour, Registry: registry.Options{MeterProvider: mp, CallTimeout: 200 * time.Millisecond,
		Backoff: registry.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}}})
	t.Cleanup(func() { srv.Resume(); r.Close() })
	backend := attribute.String("rollcall.backend", "memory")
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	b, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"})
	if err != nil {
		t.Fatal(err)
	}
	w, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	next := func(stale bool) {
		t.Helper()
		for {
			u, err := w.Next(testCtx(t))
			if err != nil {
				t.Fatal(err)
			}
			if u.Stale == stale && u.Synced {
				return
			}
		}
	}
	next(false)
	m := collected(t, rd)
	if got := value(t, m, "rollcall.registrations", backend, attribute.String("rollcall.state", "registered")); got != 2 {
		t.Errorf("registrations registered = %d, want 2", got)
	}
	if got := value(t, m, "rollcall.watcher.instances", backend, attribute.String("rollcall.service", "s")); got != 2 {
		t.Errorf("watcher instances = %d, want 2", got)
	}
	if got := value(t, m, "rollcall.watchers.stale", backend); got != 0 {
		t.Errorf("watchers stale = %d before the outage, want 0", got)
	}
	if got := samples(t, m, "rollcall.backend.call.duration", backend, attribute.String("rollcall.operation", "publish")); got != 2 {
		t.Errorf("publish calls recorded = %d, want 2", got)
	}

	srv.Pause()
	next(true)
	derr := make(chan error, 1)
	go func() { derr <- b.Deregister(context.Background()) }()
	testutil.WaitFor(t, 10*time.Second, "a failed withdrawal counted", func() bool {
		m := collected(t, rd)
		return value(t, m, "rollcall.registration.withdrawal.failures", backend, attribute.String("error.type", "timeout"))+
			value(t, m, "rollcall.registration.withdrawal.failures", backend, attribute.String("error.type", "unavailable")) >= 1
	})
	m = collected(t, rd)
	if got := value(t, m, "rollcall.watchers.stale", backend); got != 1 {
		t.Errorf("watchers stale = %d during the outage, want 1", got)
	}
	if got := value(t, m, "rollcall.registrations", backend, attribute.String("rollcall.state", "withdrawing")); got != 1 {
		t.Errorf("registrations withdrawing = %d, want 1", got)
	}
	if got := samples(t, m, "rollcall.backend.call.duration", backend, attribute.String("error.type", "timeout")); got == 0 {
		t.Error("no call that timed out recorded with error.type timeout")
	}

	srv.Resume()
	if err := <-derr; err != nil && !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("Deregister: %v", err)
	}
	next(false)
	testutil.WaitFor(t, 10*time.Second, "the stale period recorded and the withdrawal done", func() bool {
		m := collected(t, rd)
		return samples(t, m, "rollcall.watcher.stale.duration", backend, attribute.String("rollcall.service", "s")) == 1 &&
			value(t, m, "rollcall.watchers.stale", backend) == 0 &&
			value(t, m, "rollcall.registrations", backend, attribute.String("rollcall.state", "withdrawing")) == 0
	})
	if got := value(t, collected(t, rd), "rollcall.watcher.updates", backend, attribute.String("rollcall.service", "s")); got < 3 {
		t.Errorf("updates delivered = %d, want at least 3 (fresh, stale, fresh)", got)
	}
}

// Without a MeterProvider nothing is recorded and nothing is allocated for
// metrics: the registry works as before.
func TestNoMetricsWithoutAProvider(t *testing.T) {
	srv := memory.NewServer()
	r := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { r.Close() })
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	if list, err := r.Lookup(testCtx(t), "s"); err != nil || len(list) != 1 {
		t.Fatalf("Lookup: %v, %v", list, err)
	}
}
