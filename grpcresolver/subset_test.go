package grpcresolver_test

import (
	"fmt"
	"net/url"
	"slices"
	"sync"
	"testing"

	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/balancer/randomsubsetting"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/resolver"
)

// subsetProbe is a child policy that records the endpoints its parent
// (random_subsetting) gives it, by the channel target in its BuildOptions.
const subsetProbeName = "rollcall_test_subset_probe"

func init() { balancer.Register(subsetProbeBuilder{}) }

var subsets sync.Map // target → *[]string, the addresses of the last update

type subsetProbeBuilder struct{}

func (subsetProbeBuilder) Name() string { return subsetProbeName }
func (subsetProbeBuilder) Build(cc balancer.ClientConn, o balancer.BuildOptions) balancer.Balancer {
	p := &subsetProbe{target: o.Target.URL.String()}
	cc.UpdateState(balancer.State{ConnectivityState: connectivity.Ready, Picker: p})
	return p
}

type subsetProbe struct {
	balancer.Picker
	target string
}

func (p *subsetProbe) UpdateClientConnState(s balancer.ClientConnState) error {
	addrs := make([]string, 0, len(s.ResolverState.Endpoints))
	for _, ep := range s.ResolverState.Endpoints {
		addrs = append(addrs, ep.Addresses[0].Addr)
	}
	slices.Sort(addrs)
	subsets.Store(p.target, &addrs)
	return nil
}
func (p *subsetProbe) ResolverError(error)                                        {}
func (p *subsetProbe) UpdateSubConnState(balancer.SubConn, balancer.SubConnState) {}
func (p *subsetProbe) Close()                                                     {}
func (p *subsetProbe) ExitIdle()                                                  {}

// TestRandomSubsettingSpreadAndChurn measures gRPC's random_subsetting
// (gRFC A68) as the subsetting criteria state them: 100 clients,
// 50 instances, subsets of 10; how many clients each instance gets, and how
// many clients' subsets change when one instance leaves. It asserts A68's
// minimal churn (only the clients that had the instance change, by that
// one instance) and logs the spread, which is random: see docs/BENCHMARKS.md.
func TestRandomSubsettingSpreadAndChurn(t *testing.T) {
	const clients, instances, size, trials = 100, 50, 10, 20
	cfg, err := balancer.Get(randomsubsetting.Name).(balancer.ConfigParser).ParseConfig(
		[]byte(fmt.Sprintf(`{"subsetSize":%d,"childPolicy":[{%q:{}}]}`, size, subsetProbeName)))
	if err != nil {
		t.Fatal(err)
	}
	eps := make([]resolver.Endpoint, instances)
	for i := range eps {
		eps[i] = resolver.Endpoint{Addresses: []resolver.Address{{Addr: fmt.Sprintf("10.0.0.%d:80", i+1)}}}
	}
	var outside, worst, changed, maxChanged int
	for trial := range trials {
		before := map[string][]string{}
		counts := map[string]int{}
		var bals []balancer.Balancer
		for c := range clients {
			target := fmt.Sprintf("test:///t%d-c%d", trial, c)
			b := balancer.Get(randomsubsetting.Name).Build(&pickerCC{}, balancer.BuildOptions{Target: resolver.Target{URL: *mustParse(t, target)}})
			bals = append(bals, b)
			if err := b.UpdateClientConnState(balancer.ClientConnState{ResolverState: resolver.State{Endpoints: eps}, BalancerConfig: cfg}); err != nil {
				t.Fatal(err)
			}
			v, _ := subsets.Load(target)
			before[target] = *v.(*[]string)
			if len(before[target]) != size {
				t.Fatalf("client %d: subset of %d", c, len(before[target]))
			}
			for _, a := range before[target] {
				counts[a]++
			}
		}
		mean := clients * size / instances
		for _, ep := range eps {
			n := counts[ep.Addresses[0].Addr]
			if n < mean*8/10 || n > mean*12/10 {
				outside++
			}
			worst = max(worst, n-mean, mean-n)
		}
		// The first instance leaves.
		gone := eps[0].Addresses[0].Addr
		n := 0
		for c, b := range bals {
			target := fmt.Sprintf("test:///t%d-c%d", trial, c)
			if err := b.UpdateClientConnState(balancer.ClientConnState{ResolverState: resolver.State{Endpoints: eps[1:]}, BalancerConfig: cfg}); err != nil {
				t.Fatal(err)
			}
			v, _ := subsets.Load(target)
			after := *v.(*[]string)
			had := slices.Contains(before[target], gone)
			if slices.Equal(after, before[target]) {
				if had {
					t.Fatalf("client %d kept the instance that left", c)
				}
				continue
			}
			n++
			if !had {
				t.Errorf("client %d changed its subset although the instance that left was not in it", c)
			}
			kept := 0
			for _, a := range after {
				if slices.Contains(before[target], a) {
					kept++
				}
			}
			if kept != size-1 {
				t.Errorf("client %d kept %d of its %d instances", c, kept, size)
			}
		}
		for _, b := range bals {
			b.Close()
		}
		changed += n
		maxChanged = max(maxChanged, n)
	}
	t.Logf("random_subsetting, %d clients, %d instances, subsets of %d, %d trials: %.1f%% of instances outside ±20%% of the mean (%d clients), worst %d clients off; one instance leaving changes %.1f clients' subsets on average (at most %d), each by that one instance",
		clients, instances, size, trials, 100*float64(outside)/float64(trials*instances), clients*size/instances, worst, float64(changed)/trials, maxChanged)
}

func mustParse(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
