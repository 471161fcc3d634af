package registry

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Metrics, through the OpenTelemetry metric API (Options.MeterProvider; none
// when it is nil, which costs a nil check per event). Attributes:
// rollcall.backend (the backend's package name: etcd, consul, ...),
// rollcall.operation, rollcall.service, rollcall.state, and error.type (the
// class of an error: unavailable, permission, conflict, closed, timeout,
// invalid, lost, other).
const (
	metricCallDuration   = "rollcall.backend.call.duration"            // histogram, s: every call to the backend, by operation (and error.type when it failed)
	metricRegistrations  = "rollcall.registrations"                    // gauge: registrations by rollcall.state
	metricReregistered   = "rollcall.registration.reregistrations"     // counter: re-registrations after a loss, by error.type of the loss
	metricWithdrawRetry  = "rollcall.registration.withdrawal.failures" // counter: failed withdrawals (each is retried)
	metricWatchersStale  = "rollcall.watchers.stale"                   // gauge: watchers that are stale now
	metricStaleDuration  = "rollcall.watcher.stale.duration"           // histogram, s: how long each stale period lasted
	metricUpdates        = "rollcall.watcher.updates"                  // counter: updates delivered, by service
	metricWatchInstances = "rollcall.watcher.instances"                // gauge: instances a watcher lists, by service
)

// meterName is the instrumentation scope of rollcall's instruments.
const meterName = "github.com/rollcall-go/rollcall/registry"

// metrics holds a registry's instruments; a nil *metrics records nothing.
type metrics struct {
	backend       attribute.KeyValue
	calls         metric.Float64Histogram
	reregistered  metric.Int64Counter
	withdrawFails metric.Int64Counter
	staleDuration metric.Float64Histogram
	updates       metric.Int64Counter
	reg           metric.Registration
}

// newMetrics makes r's instruments, or returns nil without a provider.
func newMetrics(r *registry, mp metric.MeterProvider) (*metrics, error) {
	if mp == nil {
		return nil, nil
	}
	m := mp.Meter(meterName)
	out := &metrics{backend: attribute.String("rollcall.backend", backendName(r))}
	var err, e error
	out.calls, e = m.Float64Histogram(metricCallDuration, metric.WithUnit("s"), metric.WithDescription("Duration of calls from the shared layer to the backend."))
	err = errors.Join(err, e)
	out.reregistered, e = m.Int64Counter(metricReregistered, metric.WithUnit("{registration}"), metric.WithDescription("Registrations published again after they were lost."))
	err = errors.Join(err, e)
	out.withdrawFails, e = m.Int64Counter(metricWithdrawRetry, metric.WithUnit("{withdrawal}"), metric.WithDescription("Withdrawals that failed and are retried."))
	err = errors.Join(err, e)
	out.staleDuration, e = m.Float64Histogram(metricStaleDuration, metric.WithUnit("s"), metric.WithDescription("How long watchers stayed stale, per stale period."))
	err = errors.Join(err, e)
	out.updates, e = m.Int64Counter(metricUpdates, metric.WithUnit("{update}"), metric.WithDescription("Updates delivered by watchers."))
	err = errors.Join(err, e)
	regs, e := m.Int64ObservableGauge(metricRegistrations, metric.WithUnit("{registration}"), metric.WithDescription("Registrations by state."))
	err = errors.Join(err, e)
	stale, e := m.Int64ObservableGauge(metricWatchersStale, metric.WithUnit("{watcher}"), metric.WithDescription("Watchers that are stale."))
	err = errors.Join(err, e)
	insts, e := m.Int64ObservableGauge(metricWatchInstances, metric.WithUnit("{instance}"), metric.WithDescription("Instances listed by the watchers of a service."))
	err = errors.Join(err, e)
	if err != nil {
		return nil, err
	}
	out.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := r.observe()
		for st, n := range s.states {
			o.ObserveInt64(regs, n, metric.WithAttributes(out.backend, attribute.String("rollcall.state", st.String())))
		}
		o.ObserveInt64(stale, s.stale, metric.WithAttributes(out.backend))
		for svc, n := range s.instances {
			o.ObserveInt64(insts, n, metric.WithAttributes(out.backend, attribute.String("rollcall.service", svc)))
		}
		return nil
	}, regs, stale, insts)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// backendName is the package name of the backend's type ("etcd").
func backendName(r *registry) string {
	t := reflect.TypeOf(r.b)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.PkgPath() == "" {
		return "unknown"
	}
	p := t.PkgPath()
	return p[strings.LastIndexByte(p, '/')+1:]
}

// observation is what the observable gauges report.
type observation struct {
	states    map[State]int64
	stale     int64
	instances map[string]int64 // the most any watcher of the service lists
}

func (r *registry) observe() observation {
	r.mu.Lock()
	regs, ws := r.membersLocked()
	r.mu.Unlock()
	o := observation{states: map[State]int64{Registered: 0}, instances: map[string]int64{}}
	for _, g := range regs {
		o.states[g.Status().State]++
	}
	for _, w := range ws {
		w.f.mu.Lock()
		stale, synced, n := w.f.stale, w.f.synced, int64(len(w.f.known))
		w.f.mu.Unlock()
		if stale {
			o.stale++
		}
		if cur, ok := o.instances[w.service]; synced && (!ok || n > cur) {
			o.instances[w.service] = n
		}
	}
	return o
}

// errorType classifies err for the error.type attribute.
func errorType(err error) string {
	switch {
	case errors.Is(err, ErrPermission):
		return "permission"
	case errors.Is(err, ErrConflict):
		return "conflict"
	case errors.Is(err, ErrClosed):
		return "closed"
	case errors.Is(err, ErrInvalidInstance):
		return "invalid"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, ErrUnavailable):
		return "unavailable"
	}
	return "other"
}

func (m *metrics) call(op string, d time.Duration, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.calls.Record(context.Background(), d.Seconds(), metric.WithAttributes(m.backend, attribute.String("rollcall.operation", op), attribute.String("error.type", errorType(err))))
		return
	}
	m.calls.Record(context.Background(), d.Seconds(), metric.WithAttributes(m.backend, attribute.String("rollcall.operation", op)))
}

func (m *metrics) reregistration(cause error) {
	if m == nil {
		return
	}
	typ := "lost"
	if cause != nil {
		if t := errorType(cause); t != "other" {
			typ = t
		}
	}
	m.reregistered.Add(context.Background(), 1, metric.WithAttributes(m.backend, attribute.String("error.type", typ)))
}

func (m *metrics) withdrawFailure(err error) {
	if m == nil {
		return
	}
	m.withdrawFails.Add(context.Background(), 1, metric.WithAttributes(m.backend, attribute.String("error.type", errorType(err))))
}

func (m *metrics) update(service string) {
	if m == nil {
		return
	}
	m.updates.Add(context.Background(), 1, metric.WithAttributes(m.backend, attribute.String("rollcall.service", service)))
}

func (m *metrics) staleFor(service string, d time.Duration) {
	if m == nil {
		return
	}
	m.staleDuration.Record(context.Background(), d.Seconds(), metric.WithAttributes(m.backend, attribute.String("rollcall.service", service)))
}

// call is one backend call in progress: ctx is bounded as callCtx bounds it;
// end turns its error into what the caller sees (callErr) and records it.
type call struct {
	r      *registry
	op     string
	start  time.Time
	parent context.Context
	ctx    context.Context
	cancel context.CancelFunc
}

func (r *registry) begin(parent context.Context, op string) call {
	ctx, cancel := r.callCtx(parent)
	c := call{r: r, op: op, parent: parent, ctx: ctx, cancel: cancel}
	if r.met != nil {
		c.start = time.Now()
	}
	return c
}

func (c call) end(err error) error {
	err = c.r.callErr(c.parent, c.ctx, err)
	c.cancel()
	if c.r.met != nil {
		c.r.met.call(c.op, time.Since(c.start), err)
	}
	return err
}
