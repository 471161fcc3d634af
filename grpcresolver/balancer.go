package grpcresolver

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/balancer/endpointsharding"
	"google.golang.org/grpc/balancer/pickfirst"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/experimental/balancer/weight"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/rollcall-go/rollcall/internal/subset"
	"github.com/rollcall-go/rollcall/internal/wrr"
)

// Names of the load balancing policies this package registers with gRPC
// in its init, for a service config's loadBalancingConfig.
const (
	// WeightedRoundRobin balances over the ready endpoints in proportion
	// to their weights (registry.MetaWeight, read from gRPC's endpoint
	// weight attribute, which this package's resolver sets). Its config is
	// {}, or {"subsetSize": 10, "clientIndex": 7} for deterministic
	// subsetting (see the package doc).
	WeightedRoundRobin = "rollcall_weighted_round_robin"
	// ZonePreference sends every call to the ready endpoints in the
	// client's zone (registry.MetaZone of the instance an endpoint of this
	// package's resolver carries; other endpoints have no zone) while at
	// least minLocalReady of them are ready, and to all ready endpoints
	// otherwise; in both cases in proportion to their weights unless
	// "weighted" is false. Its config is {"zone": "eu-1a",
	// "minLocalReady": 1, "weighted": true}; zone is required,
	// minLocalReady defaults to 1 and weighted to true. It takes
	// subsetSize and clientIndex as WeightedRoundRobin does.
	ZonePreference = "rollcall_zone_preference"
)

// WeightedServiceConfig is a service config selecting WeightedRoundRobin,
// for WithServiceConfig.
const WeightedServiceConfig = `{"loadBalancingConfig":[{"` + WeightedRoundRobin + `":{}}]}`

// ZoneServiceConfig returns a service config selecting ZonePreference for
// a client in zone, falling back to every zone while fewer than
// minLocalReady endpoints of zone are ready (1 when minLocalReady < 1),
// for WithServiceConfig.
func ZoneServiceConfig(zone string, minLocalReady int) string {
	return `{"loadBalancingConfig":[{"` + ZonePreference + `":{"zone":` + strconv.Quote(zone) +
		`,"minLocalReady":` + strconv.Itoa(max(minLocalReady, 1)) + `}}]}`
}

func init() {
	balancer.Register(lbBuilder{name: WeightedRoundRobin})
	balancer.Register(lbBuilder{name: ZonePreference, zone: true})
}

// lbConfig is the parsed config of both policies.
type lbConfig struct {
	serviceconfig.LoadBalancingConfig `json:"-"`

	Zone          string `json:"zone"`
	MinLocalReady int    `json:"minLocalReady"`
	Weighted      *bool  `json:"weighted"`
	SubsetSize    int    `json:"subsetSize"`
	ClientIndex   *int   `json:"clientIndex"`
}

// lbBuilder builds both policies the way grpc-go builds round_robin: an
// endpointsharding balancer with a pick_first child per endpoint (so a
// changed weight or zone changes the picker, never a connection), and a
// picker of its own over the ready children.
type lbBuilder struct {
	name string
	zone bool // ZonePreference
}

var (
	_ balancer.Builder      = lbBuilder{}
	_ balancer.ConfigParser = lbBuilder{}
)

func (b lbBuilder) Name() string { return b.name }

func (b lbBuilder) ParseConfig(js json.RawMessage) (serviceconfig.LoadBalancingConfig, error) {
	cfg := &lbConfig{}
	if len(js) > 0 {
		if err := json.Unmarshal(js, cfg); err != nil {
			return nil, fmt.Errorf("%s: config %s: %v", b.name, js, err)
		}
	}
	if cfg.SubsetSize < 0 || cfg.SubsetSize > 0 && (cfg.ClientIndex == nil || *cfg.ClientIndex < 0) {
		return nil, fmt.Errorf(`%s: config %s: "subsetSize" must be positive, with the client's "clientIndex" (0, 1, 2, ...)`, b.name, js)
	}
	if !b.zone {
		return &lbConfig{SubsetSize: cfg.SubsetSize, ClientIndex: cfg.ClientIndex}, nil // zone fields mean nothing here
	}
	if cfg.Zone == "" {
		return nil, fmt.Errorf(`%s: config %s: "zone" (the client's zone) is required`, b.name, js)
	}
	if cfg.MinLocalReady < 1 {
		cfg.MinLocalReady = 1
	}
	return cfg, nil
}

func (b lbBuilder) Build(cc balancer.ClientConn, opts balancer.BuildOptions) balancer.Balancer {
	lb := &lbBalancer{ClientConn: cc, name: b.name, cfg: &lbConfig{}}
	lb.child = endpointsharding.NewBalancer(lb, opts, balancer.Get(pickfirst.Name).Build, endpointsharding.Options{})
	return lb
}

// lbBalancer is both policies. It is the endpointsharding child's
// ClientConn, so that it sees the children's states in UpdateState and
// sends its own picker instead.
type lbBalancer struct {
	balancer.ClientConn // the channel's
	name                string
	child               balancer.Balancer // endpointsharding
	seq                 atomic.Uint64     // the schedule's sequence, kept across pickers

	mu  sync.Mutex // UpdateState may come from an ExitIdle goroutine of endpointsharding
	cfg *lbConfig
}

func (b *lbBalancer) UpdateClientConnState(s balancer.ClientConnState) error {
	cfg, ok := s.BalancerConfig.(*lbConfig)
	switch {
	case s.BalancerConfig == nil:
		cfg = &lbConfig{} // built by hand, without a parsed config: weights only
	case !ok:
		return fmt.Errorf("%s: unexpected config %T", b.name, s.BalancerConfig)
	}
	b.mu.Lock()
	b.cfg = cfg
	b.mu.Unlock()
	rs := s.ResolverState
	if cfg.SubsetSize > 0 {
		rs.Endpoints = subsetOf(rs.Endpoints, cfg.SubsetSize, *cfg.ClientIndex)
		rs.Addresses = nil
	}
	// The child sends its state, and so the new picker, before returning.
	return b.child.UpdateClientConnState(balancer.ClientConnState{
		ResolverState: pickfirst.EnableHealthListener(rs),
	})
}

// subsetOf returns the endpoints of the client's deterministic subset (see
// package internal/subset), by their first addresses.
func subsetOf(eps []resolver.Endpoint, size, client int) []resolver.Endpoint {
	eps = slices.DeleteFunc(slices.Clone(eps), func(ep resolver.Endpoint) bool { return len(ep.Addresses) == 0 })
	keys := make([]string, len(eps))
	for i, ep := range eps {
		keys[i] = ep.Addresses[0].Addr
	}
	idx := subset.Choose(keys, size, client)
	out := make([]resolver.Endpoint, len(idx))
	for j, i := range idx {
		out[j] = eps[i]
	}
	return out
}

func (b *lbBalancer) ResolverError(err error) { b.child.ResolverError(err) }

func (b *lbBalancer) UpdateSubConnState(sc balancer.SubConn, s balancer.SubConnState) {
	b.child.UpdateSubConnState(sc, s) // deprecated; never called with pick_first children
}

func (b *lbBalancer) Close() { b.child.Close() }

func (b *lbBalancer) ExitIdle() { b.child.ExitIdle() }

// UpdateState receives endpointsharding's state and sends the channel a
// picker over the chosen ready endpoints. Without any ready endpoint it
// passes endpointsharding's state and picker on (connecting, or failing
// with the children's errors).
func (b *lbBalancer) UpdateState(s balancer.State) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ready []endpointsharding.ChildState
	for _, cs := range endpointsharding.ChildStatesFromPicker(s.Picker) {
		if cs.State.ConnectivityState == connectivity.Ready {
			ready = append(ready, cs)
		}
	}
	if len(ready) == 0 {
		b.ClientConn.UpdateState(s)
		return
	}
	if b.cfg.Zone != "" {
		if local := localOnly(ready, b.cfg.Zone); len(local) >= b.cfg.MinLocalReady {
			ready = local
		}
	}
	weighted := b.cfg.Weighted == nil || *b.cfg.Weighted
	p := &lbPicker{pickers: make([]balancer.Picker, len(ready)), seq: &b.seq}
	weights := make([]int, len(ready))
	for i, cs := range ready {
		p.pickers[i] = cs.State.Picker
		weights[i] = 1
		if weighted {
			weights[i] = endpointWeight(cs.Endpoint)
		}
	}
	p.sched = wrr.New(weights)
	b.ClientConn.UpdateState(balancer.State{ConnectivityState: connectivity.Ready, Picker: p})
}

// localOnly returns the children whose instance is in zone.
func localOnly(cs []endpointsharding.ChildState, zone string) []endpointsharding.ChildState {
	var out []endpointsharding.ChildState
	for _, c := range cs {
		if in, ok := instanceOf(c.Endpoint); ok && in.Zone() == zone {
			out = append(out, c)
		}
	}
	return out
}

// endpointWeight is gRPC's endpoint weight attribute (which the resolver
// sets from registry.MetaWeight), 1 when unset.
func endpointWeight(ep resolver.Endpoint) int {
	if w := weight.FromEndpoint(ep).Weight; w > 0 {
		return int(w)
	}
	return 1
}

// lbPicker is immutable; the sequence it advances is the balancer's.
type lbPicker struct {
	pickers []balancer.Picker // the ready children's pick_first pickers
	sched   *wrr.Schedule
	seq     *atomic.Uint64
}

func (p *lbPicker) Pick(info balancer.PickInfo) (balancer.PickResult, error) {
	return p.pickers[p.sched.Next(p.seq)].Pick(info)
}
