package grpcresolver_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/balancer"
	_ "google.golang.org/grpc/balancer/randomsubsetting"
	_ "google.golang.org/grpc/balancer/ringhash"
	"google.golang.org/grpc/experimental/balancer/weight"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// countingPrefix names test policies that wrap one of the package's
// policies and count the SubConns it creates, per channel target.
const countingPrefix = "rollcall_test_counting_"

func init() {
	balancer.Register(countingBuilder{inner: grpcresolver.WeightedRoundRobin})
	balancer.Register(countingBuilder{inner: grpcresolver.ZonePreference})
}

var subConnCounts sync.Map // channel target → *atomic.Int64

type countingBuilder struct{ inner string }

func (b countingBuilder) Name() string { return countingPrefix + b.inner }

func (b countingBuilder) ParseConfig(js json.RawMessage) (serviceconfig.LoadBalancingConfig, error) {
	return balancer.Get(b.inner).(balancer.ConfigParser).ParseConfig(js)
}

func (b countingBuilder) Build(cc balancer.ClientConn, opts balancer.BuildOptions) balancer.Balancer {
	n, _ := subConnCounts.LoadOrStore(opts.Target.URL.String(), new(atomic.Int64))
	return balancer.Get(b.inner).Build(&countingCC{ClientConn: cc, n: n.(*atomic.Int64)}, opts)
}

type countingCC struct {
	balancer.ClientConn
	n *atomic.Int64
}

func (c *countingCC) NewSubConn(addrs []resolver.Address, opts balancer.NewSubConnOptions) (balancer.SubConn, error) {
	c.n.Add(1)
	return c.ClientConn.NewSubConn(addrs, opts)
}

// subConnsCreated returns how many SubConns the counting policy created for
// the channel of target.
func subConnsCreated(target string) int64 {
	n, ok := subConnCounts.Load(target)
	if !ok {
		return 0
	}
	return n.(*atomic.Int64).Load()
}

// dialConfig dials target through a builder sending the service config sc.
func dialConfig(t testing.TB, target, sc string) *grpc.ClientConn {
	t.Helper()
	scheme, _, _ := strings.Cut(target, ":")
	return dial(t, target, grpc.WithResolvers(grpcresolver.NewBuilder(scheme, grpcresolver.WithServiceConfig(sc))))
}

// testSelection runs the policies' and filters' end-to-end tests against
// registry servers made by mk.
func testSelection(t *testing.T, mk func(t testing.TB) env) {
	for _, tc := range []struct {
		name string
		test func(*testing.T, env)
	}{
		{"WeightsSplitCallsAndChangeWithoutNewSubConns", testWeightedRoundRobinFollowsWeightsWithoutNewSubConns},
		{"ZonePreferenceKeepsCallsLocalFailsOverAndComesBack", testZonePreferenceKeepsCallsLocalFailsOverAndComesBack},
		{"ZonePreferenceIsWeighted", testZonePreferenceIsWeighted},
		{"TargetFilterFollowsAMetadataChange", testTargetFilterFollowsAMetadataChange},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, mk(t)) })
	}
}

func TestSelectionMemory(t *testing.T) {
	testSelection(t, func(t testing.TB) env { return newMemEnv(t) })
}

func policyConfig(name, cfg string) string {
	return `{"loadBalancingConfig":[{"` + name + `":` + cfg + `}]}`
}

// checkShare fails the test unless counts[addr] is want ±10%.
func checkShare(t testing.TB, counts map[string]int, addr string, want int) {
	t.Helper()
	if got := counts[addr]; got < want*9/10 || got > want*11/10 {
		t.Errorf("%s got %d calls, want %d ±10%%: %v", addr, got, want, counts)
	}
}

func withWeight(w int) map[string]string {
	return map[string]string{registry.MetaWeight: fmt.Sprint(w)}
}

func testWeightedRoundRobinFollowsWeightsWithoutNewSubConns(t *testing.T, e env) {
	a := startServer(t, e, "echo", "a", time.Second, withWeight(1))
	b := startServer(t, e, "echo", "b", time.Second, withWeight(3))
	target := e.URL() + "/echo"
	conn := dialConfig(t, target, policyConfig(countingPrefix+grpcresolver.WeightedRoundRobin, `{}`))
	waitAllServing(t, conn, []*server{a, b})

	counts := callN(t, conn, 4000)
	checkShare(t, counts, a.addr, 1000)
	checkShare(t, counts, b.addr, 3000)

	// a's weight becomes 3 in the registry: traffic splits evenly, over
	// the same connections.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.rr.Update(ctx, registry.Instance{Service: "echo", ID: "a", Addr: a.addr, Metadata: withWeight(3)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "calls split evenly after the weight change", func() bool {
		c := callN(t, conn, 400)
		return c[a.addr] >= 180 && c[a.addr] <= 220
	})
	counts = callN(t, conn, 4000)
	checkShare(t, counts, a.addr, 2000)
	checkShare(t, counts, b.addr, 2000)
	if n := subConnsCreated(target); n != 2 {
		t.Errorf("%d SubConns created for 2 endpoints; a weight change must not create any", n)
	}
}

func testZonePreferenceKeepsCallsLocalFailsOverAndComesBack(t *testing.T, e env) {
	zone := func(z string) map[string]string { return map[string]string{registry.MetaZone: z} }
	local := []*server{
		startServer(t, e, "echo", "a1", time.Second, zone("a")),
		startServer(t, e, "echo", "a2", time.Second, zone("a")),
	}
	remote := []*server{
		startServer(t, e, "echo", "b1", time.Second, zone("b")),
		startServer(t, e, "echo", "b2", time.Second, zone("b")),
	}
	target := e.URL() + "/echo"
	conn := dialConfig(t, target, grpcresolver.ZoneServiceConfig("a", 2))
	// While fewer than 2 local endpoints are ready calls may go anywhere.
	waitAllServing(t, conn, local)

	counts := callN(t, conn, 1000)
	if counts[local[0].addr]+counts[local[1].addr] != 1000 || counts[local[0].addr] == 0 || counts[local[1].addr] == 0 {
		t.Fatalf("with both local endpoints ready, calls went to %v; want all 1000 on %s and %s", counts, local[0].addr, local[1].addr)
	}

	// One local endpoint goes: fewer than 2 are ready, calls fail over to
	// every zone.
	local[0].crash(t, e)
	waitFor(t, 10*time.Second, "calls served in zone b", func() bool {
		addr, err := call(context.Background(), conn)
		return err == nil && (addr == remote[0].addr || addr == remote[1].addr)
	})
	local[1].crash(t, e)
	waitFor(t, 10*time.Second, "50 calls in a row served in zone b", func() bool {
		for range 50 {
			addr, err := call(context.Background(), conn)
			if err != nil || addr != remote[0].addr && addr != remote[1].addr {
				return false
			}
		}
		return true
	})
	counts = callN(t, conn, 200)
	if counts[remote[0].addr] == 0 || counts[remote[1].addr] == 0 {
		t.Fatalf("after the failover: %v; want calls on both of zone b", counts)
	}

	// Two local endpoints are back: every call is local again.
	back := []*server{
		startServer(t, e, "echo", "a3", time.Second, zone("a")),
		startServer(t, e, "echo", "a4", time.Second, zone("a")),
	}
	waitFor(t, 10*time.Second, "50 calls in a row served in zone a", func() bool {
		for range 50 {
			addr, err := call(context.Background(), conn)
			if err != nil || addr != back[0].addr && addr != back[1].addr {
				return false
			}
		}
		return true
	})
	counts = callN(t, conn, 1000)
	if counts[back[0].addr]+counts[back[1].addr] != 1000 {
		t.Fatalf("with the local endpoints back, calls went to %v; want all on %s and %s", counts, back[0].addr, back[1].addr)
	}
}

func testZonePreferenceIsWeighted(t *testing.T, e env) {
	md := func(z string, w int) map[string]string {
		return map[string]string{registry.MetaZone: z, registry.MetaWeight: fmt.Sprint(w)}
	}
	a1 := startServer(t, e, "echo", "a1", time.Second, md("a", 1))
	a2 := startServer(t, e, "echo", "a2", time.Second, md("a", 3))
	startServer(t, e, "echo", "b1", time.Second, md("b", 5))
	conn := dialConfig(t, e.URL()+"/echo", grpcresolver.ZoneServiceConfig("a", 1))
	waitAllServing(t, conn, []*server{a1, a2})
	counts := callN(t, conn, 4000)
	checkShare(t, counts, a1.addr, 1000)
	checkShare(t, counts, a2.addr, 3000)
}

func TestPolicyConfigs(t *testing.T) {
	parse := func(name, js string) error {
		_, err := balancer.Get(name).(balancer.ConfigParser).ParseConfig(json.RawMessage(js))
		return err
	}
	for _, tc := range []struct {
		name, js string
		ok       bool
	}{
		{grpcresolver.WeightedRoundRobin, `{}`, true},
		{grpcresolver.ZonePreference, `{"zone":"a"}`, true},
		{grpcresolver.ZonePreference, `{"zone":"a","minLocalReady":3,"weighted":false}`, true},
		{grpcresolver.ZonePreference, `{}`, false},
		{grpcresolver.WeightedRoundRobin, `{"subsetSize":10,"clientIndex":0}`, true},
		{grpcresolver.ZonePreference, `{"zone":"a","subsetSize":10,"clientIndex":3}`, true},
		{grpcresolver.WeightedRoundRobin, `{"subsetSize":10}`, false},
		{grpcresolver.WeightedRoundRobin, `{"subsetSize":10,"clientIndex":-1}`, false},
		{grpcresolver.WeightedRoundRobin, `{"subsetSize":-1}`, false},
		{grpcresolver.ZonePreference, `{"zone":5}`, false},
	} {
		if err := parse(tc.name, tc.js); (err == nil) != tc.ok {
			t.Errorf("%s %s: err %v, want ok=%v", tc.name, tc.js, err, tc.ok)
		}
	}
	var v any
	if err := json.Unmarshal([]byte(grpcresolver.ZoneServiceConfig(`eu"1`, 0)), &v); err != nil {
		t.Errorf("ZoneServiceConfig with a quote in the zone: %v", err)
	}
}

func TestResolverSetsGRPCEndpointWeight(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1001", Metadata: withWeight(7)})
	register(t, reg, registry.Instance{Service: "svc", ID: "b", Addr: "127.0.0.1:1002"})
	cc := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "two endpoints", func() bool { return len(cc.ids()) == 2 })
	s, _ := cc.last()
	for i, want := range []uint32{7, 1} {
		if got := weight.FromEndpoint(s.Endpoints[i]).Weight; got != want {
			t.Errorf("endpoint %s: gRPC weight attribute %d, want %d", endpointIDs(s)[i], got, want)
		}
	}
}

func TestRandomSubsettingComposesWithWeightedRoundRobin(t *testing.T) {
	e := newMemEnv(t)
	weights := map[string]int{} // by address
	for i := range 6 {
		s := startServer(t, e, "echo", fmt.Sprintf("s%d", i), time.Second, withWeight(1+i%2))
		weights[s.addr] = 1 + i%2
	}
	target := e.URL() + "/echo"
	conn := dialConfig(t, target, `{"loadBalancingConfig":[{"random_subsetting_experimental":{"subsetSize":3,
		"childPolicy":[{"`+countingPrefix+grpcresolver.WeightedRoundRobin+`":{}}]}}]}`)
	counts := map[string]int{}
	waitFor(t, 10*time.Second, "3 servers answering", func() bool {
		if addr, err := call(context.Background(), conn); err == nil {
			counts[addr]++
		}
		return len(counts) == 3
	})
	counts = callN(t, conn, 1200)
	if len(counts) != 3 {
		t.Fatalf("calls went to %d servers, want the subset of 3: %v", len(counts), counts)
	}
	if n := subConnsCreated(target); n != 3 {
		t.Errorf("%d SubConns for a subset of 3", n)
	}
	sum := 0
	for addr := range counts {
		sum += weights[addr]
	}
	for addr := range counts {
		checkShare(t, counts, addr, 1200*weights[addr]/sum)
	}
}

func TestDeterministicSubsetsOfARoundPartitionTheInstances(t *testing.T) {
	// 10 servers, subsets of 3: a round is 4 clients (indexes 0-3), whose
	// subsets (3, 3, 2 and 2 servers) hold every server once. Each channel
	// connects to its subset only and calls every server of it.
	e := newMemEnv(t)
	all := map[string]bool{}
	for i := range 10 {
		all[startServer(t, e, "echo", fmt.Sprintf("s%d", i), time.Second, nil).addr] = true
	}
	owner := map[string]int{} // server → client index
	for client := range 4 {
		tg := e.URL() + fmt.Sprintf("/echo#c%d", client) // a target of its own, for the SubConn count
		conn := dialConfig(t, tg, policyConfig(countingPrefix+grpcresolver.WeightedRoundRobin, fmt.Sprintf(`{"subsetSize":3,"clientIndex":%d}`, client)))
		counts := map[string]int{}
		waitFor(t, 10*time.Second, "calls reaching the subset", func() bool {
			for range 30 {
				addr, err := call(context.Background(), conn)
				if err != nil {
					return false
				}
				counts[addr]++
			}
			return len(counts) >= 2 && int64(len(counts)) == subConnsCreated(tg)
		})
		for range 300 {
			addr, err := call(context.Background(), conn)
			if err != nil {
				t.Fatal(err)
			}
			counts[addr]++
		}
		if n := len(counts); n < 2 || n > 3 || int64(n) != subConnsCreated(tg) {
			t.Fatalf("client %d called %d servers over %d SubConns: %v; want its subset of 2 or 3", client, n, subConnsCreated(tg), counts)
		}
		for addr := range counts {
			if c, dup := owner[addr]; dup {
				t.Fatalf("server %s is in the subsets of clients %d and %d of one round", addr, c, client)
			}
			owner[addr] = client
		}
	}
	if len(owner) != len(all) {
		t.Fatalf("the round's subsets hold %d of the %d servers: %v", len(owner), len(all), owner)
	}
}

func TestRingHashSeesTheWeights(t *testing.T) {
	// gRPC's own ring_hash reads the endpoint weight attribute the resolver
	// sets: with weights 1:3 about a quarter of the ring is a's (equal
	// weights would give a half). Calls without the hash header take
	// random hashes; the ring (4,096 entries, gRPC's cap) and the calls
	// each put about 0.7% of noise on a's share, so 25% ±8% is 8 standard
	// deviations wide.
	e := newMemEnv(t)
	a := startServer(t, e, "echo", "a", time.Second, withWeight(1))
	b := startServer(t, e, "echo", "b", time.Second, withWeight(3))
	conn := dialConfig(t, e.URL()+"/echo", policyConfig("ring_hash_experimental", `{"requestHashHeader":"x-hash"}`))
	waitAllServing(t, conn, []*server{a, b})
	counts := callN(t, conn, 4000)
	if n := counts[a.addr]; n < 680 || n > 1320 {
		t.Fatalf("ring_hash sent a (weight 1 of 4) %d of 4000 calls, want 1000 ±320: %v", n, counts)
	}
}
