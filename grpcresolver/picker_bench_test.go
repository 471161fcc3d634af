package grpcresolver_test

import (
	"fmt"
	"testing"

	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/balancer/roundrobin"
	"google.golang.org/grpc/connectivity"
	estats "google.golang.org/grpc/experimental/stats"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// pickerCC is a balancer.ClientConn whose SubConns connect when the test
// says so; it keeps the last picker, for measuring Pick alone.
type pickerCC struct {
	balancer.ClientConn
	scs    []*pickerSC
	picker balancer.Picker
	state  connectivity.State
}

type pickerSC struct {
	balancer.SubConn
	listener func(balancer.SubConnState)
	health   func(balancer.SubConnState)
}

func (c *pickerCC) NewSubConn(_ []resolver.Address, o balancer.NewSubConnOptions) (balancer.SubConn, error) {
	sc := &pickerSC{listener: o.StateListener}
	c.scs = append(c.scs, sc)
	return sc, nil
}
func (c *pickerCC) UpdateState(s balancer.State)                         { c.picker, c.state = s.Picker, s.ConnectivityState }
func (c *pickerCC) ResolveNow(resolver.ResolveNowOptions)                {}
func (c *pickerCC) Target() string                                       { return "bench" }
func (c *pickerCC) MetricsRecorder() estats.MetricsRecorder              { return noopRecorder{} }
func (c *pickerCC) RemoveSubConn(balancer.SubConn)                       {}
func (c *pickerCC) UpdateAddresses(balancer.SubConn, []resolver.Address) {}

func (s *pickerSC) Connect()                                             {}
func (s *pickerSC) Shutdown()                                            {}
func (s *pickerSC) UpdateAddresses([]resolver.Address)                   {}
func (s *pickerSC) RegisterHealthListener(f func(balancer.SubConnState)) { s.health = f }

type noopRecorder struct{ estats.MetricsRecorder }

func (noopRecorder) RecordInt64Count(*estats.Int64CountHandle, int64, ...string)             {}
func (noopRecorder) RecordFloat64Count(*estats.Float64CountHandle, float64, ...string)       {}
func (noopRecorder) RecordInt64Histo(*estats.Int64HistoHandle, int64, ...string)             {}
func (noopRecorder) RecordFloat64Histo(*estats.Float64HistoHandle, float64, ...string)       {}
func (noopRecorder) RecordInt64Gauge(*estats.Int64GaugeHandle, int64, ...string)             {}
func (noopRecorder) RecordInt64UpDownCount(*estats.Int64UpDownCountHandle, int64, ...string) {}
func (noopRecorder) RegisterAsyncReporter(estats.AsyncMetricReporter, ...estats.AsyncMetric) func() {
	return func() {}
}

// readyPicker builds the policy name over n endpoints (weights 1-10, zones
// a and b), makes every SubConn ready, and returns the channel's picker.
func readyPicker(tb testing.TB, name, cfg string, n int) balancer.Picker {
	tb.Helper()
	bb := balancer.Get(name)
	var lbc serviceconfig.LoadBalancingConfig
	if p, ok := bb.(balancer.ConfigParser); ok {
		var err error
		if lbc, err = p.ParseConfig([]byte(cfg)); err != nil {
			tb.Fatal(err)
		}
	}
	cc := &pickerCC{}
	b := bb.Build(cc, balancer.BuildOptions{})
	tb.Cleanup(b.Close)
	eps := make([]resolver.Endpoint, n)
	for i := range eps {
		eps[i] = grpcresolver.EndpointOf(registry.Instance{Service: "svc", ID: fmt.Sprint(i), Addr: fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1),
			Metadata: map[string]string{registry.MetaWeight: fmt.Sprint(1 + i%10), registry.MetaZone: []string{"a", "b"}[i%2]}})
	}
	if err := b.UpdateClientConnState(balancer.ClientConnState{ResolverState: resolver.State{Endpoints: eps}, BalancerConfig: lbc}); err != nil {
		tb.Fatal(err)
	}
	for _, sc := range cc.scs {
		sc.listener(balancer.SubConnState{ConnectivityState: connectivity.Connecting})
		sc.listener(balancer.SubConnState{ConnectivityState: connectivity.Ready})
		if sc.health != nil {
			sc.health(balancer.SubConnState{ConnectivityState: connectivity.Ready})
		}
	}
	if cc.state != connectivity.Ready || len(cc.scs) != n {
		tb.Fatalf("%s: state %v with %d SubConns, want READY with %d", name, cc.state, len(cc.scs), n)
	}
	seen := map[balancer.SubConn]bool{}
	for range 20 * n {
		r, err := cc.picker.Pick(balancer.PickInfo{})
		if err != nil {
			tb.Fatalf("%s: Pick: %v", name, err)
		}
		seen[r.SubConn] = true
	}
	if want := map[bool]int{true: n / 2, false: n}[name == grpcresolver.ZonePreference]; len(seen) != want {
		tb.Fatalf("%s: picks reached %d SubConns, want %d", name, len(seen), want)
	}
	return cc.picker
}

// BenchmarkPick measures one Pick of a ready channel's picker: gRPC's
// round_robin next to this package's policies.
func BenchmarkPick(b *testing.B) {
	for _, p := range []struct{ name, cfg string }{
		{roundrobin.Name, ""},
		{grpcresolver.WeightedRoundRobin, `{}`},
		{grpcresolver.ZonePreference, `{"zone":"a"}`},
	} {
		for _, n := range []int{10, 1000} {
			b.Run(fmt.Sprintf("%s/%d", p.name, n), func(b *testing.B) {
				picker := readyPicker(b, p.name, p.cfg, n)
				b.ReportAllocs()
				for b.Loop() {
					if _, err := picker.Pick(balancer.PickInfo{}); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func TestPickersReachEveryReadyEndpoint(t *testing.T) {
	// The benchmark's setup, checked: all three policies pick every ready
	// endpoint (zone preference: every one of its zone).
	for _, name := range []string{roundrobin.Name, grpcresolver.WeightedRoundRobin, grpcresolver.ZonePreference} {
		readyPicker(t, name, `{"zone":"a"}`, 10)
	}
}
