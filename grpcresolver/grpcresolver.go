// Package grpcresolver plugs rollcall into gRPC name resolution: a gRPC client
// dials a service registered in any rollcall backend by a target URL.
//
// After blank imports of a backend and of this package,
//
//	import (
//		_ "github.com/rollcall-go/rollcall/backends/etcd"
//		_ "github.com/rollcall-go/rollcall/grpcresolver"
//	)
//
//	conn, err := grpc.NewClient("etcd://127.0.0.1:2379/user.rpc",
//		grpc.WithTransportCredentials(insecure.NewCredentials()))
//
// balances the calls round robin over the live instances of user.rpc (see
// Load balancing policies for weights and zones).
//
// # Target form
//
// A target is the registry URL (as given to registry.Open) with the service
// name appended as the last path segment. Everything before the last segment,
// and every query parameter, stays with the registry URL (SplitTarget does
// the split):
//
//	target                                   registry URL                       service
//	etcd://h1:2379,h2:2379/user.rpc          etcd://h1:2379,h2:2379             user.rpc
//	etcd://h:2379/team-a/user.rpc?ttl=5s     etcd://h:2379/team-a?ttl=5s        user.rpc (prefix team-a)
//	mem://demo/user.rpc                      mem://demo                         user.rpc
//	consul://h:8500/user.rpc?dc=dc1          consul://h:8500?dc=dc1             user.rpc
//	consul:///user.rpc                       consul:///                         user.rpc (agent of $CONSUL_HTTP_ADDR)
//	nacos://h:8848/user.rpc?namespace=dev    nacos://h:8848?namespace=dev       user.rpc
//	k8s://namespace/service:port             k8s://namespace                    service:port
//	k8s:///service:port                      k8s:///                            service:port (kubeconfig's namespace)
//	static://10.0.0.1:80,10.0.0.2:80/user.rpc static://10.0.0.1:80,10.0.0.2:80  user.rpc (fixed endpoints)
//	static:///user.rpc?file=eps.json         static:///?file=eps.json           user.rpc (endpoints from a file)
//
// Query parameters whose names begin with "meta." (FilterParamPrefix) are
// the target's own, a filter (see Filters); SplitTarget and the resolver take
// them out, and every other parameter is the registry URL's:
//
//	etcd://h:2379/user.rpc?ttl=5s&meta.version=v2  →  registry etcd://h:2379?ttl=5s, service user.rpc, version v2 only
//
// The registry URL's own form, for each scheme, is in its backend's package
// doc. The service name must be a valid registry service name (letters,
// digits and . _ - :); Build rejects a target without one. The channel's
// default authority is the service name.
//
// # Registration with gRPC
//
// The package registers a builder in gRPC's global resolver registry, in
// its init, for each scheme of the backends rollcall knows: etcd, mem, consul,
// nacos, k8s and static. The builder opens the registry URL with registry.Open when
// gRPC builds a resolver, so only the backend's blank import is needed; a
// scheme whose backend is not linked makes Build fail with an error that
// names the import to add. Register adds a scheme of another backend.
// NewBuilder returns a builder with options (a service config, a registry
// you already hold, a logger) for grpc.WithResolvers.
//
// # One binary with go-zero (or another library that registers etcd://)
//
// go-zero's zrpc registers the gRPC schemes direct, discov, etcd and k8s in
// its init, and so does this package for etcd and k8s. gRPC keeps the last
// registration of a scheme, so in a binary that links both, which resolver a
// plain etcd:// or k8s:// target gets depends on the order in which Go
// initializes the two packages, which follows the import graph. Make the
// choice explicit:
//
//   - rollcall targets use the rollcall+ schemes (SchemePrefix), which only
//     this package registers: rollcall+etcd://h:2379/user.rpc,
//     rollcall+k8s://namespace/service:port. Or give the channel its resolver:
//     grpc.WithResolvers(grpcresolver.NewBuilder("etcd")) wins over the
//     global registry for that channel.
//   - Plain etcd:// and k8s:// are decided by the main package's init, which
//     runs after the init of every package it imports: call go-zero's
//     zrpc/resolver.Register() there to keep them go-zero's (zrpc clients
//     configured with Etcd build etcd:///hosts?key=KEY targets, which only
//     go-zero's resolver reads), or grpcresolver.Register("etcd") to make
//     them rollcall's.
//
// A rollcall client reads the registrations of go-zero servers with the
// etcd backend's go-zero layout: rollcall+etcd://h:2379/user.rpc?layout=gozero
// resolves what a go-zero server with Etcd.Key user.rpc publishes; a
// rollcall server registered with layout=gozero is found by zrpc clients.
//
// # What the resolver pushes
//
// Each update is a complete resolver.State with one Endpoint per instance
// (and the same addresses in State.Addresses for older balancers), sorted by
// instance ID. Instances that share an address are merged into one endpoint
// (the one with the smallest ID wins). Each Endpoint carries its
// registry.Instance as an attribute (see InstanceFromEndpoint) and its
// weight (registry.MetaWeight, 1 when unset) in gRPC's endpoint weight
// attribute (google.golang.org/grpc/experimental/balancer/weight), which
// gRPC's ring_hash and this package's policies read; attributes of an
// unchanged instance compare equal, and an update that changes nothing is
// not pushed, so no-op registry events cause no connection churn.
//
// The state carries a default service config selecting round_robin, unless
// the builder was made with WithServiceConfig or the channel was dialed with
// grpc.WithDisableServiceConfig. Note that a service config from the resolver
// takes precedence over grpc.WithDefaultServiceConfig: to choose another
// policy, use NewBuilder with WithServiceConfig.
//
// # Filters
//
// A resolver can pass on only some instances of its service:
//
//	etcd://h:2379/user.rpc?meta.version=v2                      metadata version is v2
//	etcd://h:2379/user.rpc?meta.version=v2&meta.version=v3      v2 or v3
//	etcd://h:2379/user.rpc?meta.version=v2&meta.canary=true     v2 and canary=true
//	etcd://h:2379/user.rpc?meta.canary=                         no canary key (or an empty one)
//
// so that a config file holding only a target string (go-zero's etc/*.yaml,
// say) can choose a version or a label. From code, NewBuilder's WithFilter
// takes any predicate (registry.MatchMetadata makes the one above); every
// filter of the builder and of the target must keep an instance. Filters
// follow the registry: an instance whose metadata changes (Registration.Update)
// joins or leaves the endpoints with the change. Filtered-out instances
// count as absent: a filter that keeps none pushes an empty list, and calls
// fail with Unavailable.
//
// # Load balancing policies
//
// The package also registers two load balancing policies with gRPC, for a
// service config (WithServiceConfig, or any service config gRPC reads):
//
//	{"loadBalancingConfig":[{"rollcall_weighted_round_robin":{}}]}
//	{"loadBalancingConfig":[{"rollcall_zone_preference":{"zone":"eu-1a","minLocalReady":2}}]}
//
// WeightedRoundRobin balances calls over the ready endpoints in proportion
// to their weights, smoothly (weights 1:3 give B B A B, B B A B, ...: no
// endpoint gets its share in bursts). ZonePreference sends every call to the
// ready endpoints whose registry.MetaZone is the configured zone while at
// least minLocalReady (default 1) of them are ready, and to every ready
// endpoint otherwise; weighted like WeightedRoundRobin unless its config
// says "weighted": false. Both are built as gRPC's round_robin is: an
// endpointsharding balancer with a pick_first child per endpoint, so each
// endpoint keeps one connection (endpoints of other zones too, for a quick
// failover), and a change of weight or zone in the registry changes only the
// picker, never a connection. A pick is an atomic add and a few integer
// operations, without locks or allocations (see docs/BENCHMARKS.md).
// WeightedServiceConfig and ZoneServiceConfig write these configs.
//
// # Subsetting
//
// For large fleets, each client can connect to a subset of the endpoints.
// Both policies take "subsetSize" and "clientIndex" (0, 1, 2, ... for the
// clients of the service: a StatefulSet ordinal, a worker number):
//
//	{"loadBalancingConfig":[{"rollcall_weighted_round_robin":{"subsetSize":10,"clientIndex":7}}]}
//
// The subsets are deterministic: clients with consecutive indexes form
// rounds of ceil(n/subsetSize) clients whose subsets divide the n endpoints
// among them, each endpoint in one subset, the subsets within one endpoint
// in size. With dense indexes every endpoint serves the same number of
// clients. An endpoint leaving changes, in each round, its own subset and
// usually one other; when n crosses a multiple of subsetSize every subset is
// drawn anew. The subset is taken before zones and weights are looked at.
//
// gRPC's random_subsetting policy (gRFC A68; import
// google.golang.org/grpc/balancer/randomsubsetting) needs no index: each
// client hashes the endpoints with a seed of its own and keeps the
// subsetSize lowest, then balances over them with its child policy:
//
//	{"loadBalancingConfig":[{"random_subsetting_experimental":{"subsetSize":10,
//	  "childPolicy":[{"rollcall_weighted_round_robin":{}}]}}]}
//
// An endpoint leaving changes only the subsets that held it, but the spread
// is random. Measured with 100 clients, 50 endpoints and subsets of 10 (mean
// 20 clients per endpoint; docs/BENCHMARKS.md): random_subsetting leaves
// about a quarter of the endpoints outside 16-24 clients (some at 8 or 32),
// and one endpoint leaving changes the subsets of the 20 clients that had
// it; the deterministic subsets give every endpoint exactly 20 clients, and
// one endpoint leaving changes about 40 clients' subsets, by one endpoint
// each.
//
// # Registry failures
//
// While the registry is unreachable the resolver keeps the last list it
// pushed: it pushes no empty or shrunken list and reports no error that would
// drop addresses. It reports an error only while no list has ever been known.
// A list that is really empty (the service has no instances) is pushed.
// gRPC's ResolveNow hints trigger a relist (registry Lookup) while the watch
// is stale, at most once per WithResolveNowInterval; its result is used until
// the watch is fresh again. While the watch is live, hints cost nothing.
//
// Resolvers that open the same registry URL share one registry.Registry; it
// is closed when the last of them closes.
//
// # Large services
//
// The resolver's work per update is a copy of the endpoint list (about 0.1 ms
// and 100 KB for 1,000 instances, a constant number of allocations). gRPC's
// channel, by default, also formats every resolver state as JSON for its
// trace log (about 7 ms and 4 MB per update for 1,000 instances); an
// application installs a logger whose V(0) is false to avoid it:
//
//	grpclog.SetLoggerV2(grpclog.NewLoggerV2WithVerbosity(io.Discard, io.Discard, os.Stderr, -1))
//
// See docs/BENCHMARKS.md.
package grpcresolver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/registry"
)

// KnownSchemes are the schemes registered with gRPC by this package's init:
// those of the backends rollcall ships. Each is registered twice: as it is
// (etcd) and with SchemePrefix (rollcall+etcd).
var KnownSchemes = []string{"etcd", "mem", "consul", "nacos", "k8s", "static"}

// SchemePrefix makes the collision-free name under which this package's
// init also registers each known scheme: a target rollcall+etcd://h:2379/user.rpc
// resolves as etcd://h:2379/user.rpc does, through rollcall, whatever else
// the binary links. Other libraries register plain etcd and k8s too
// (go-zero's zrpc does, in its init), and gRPC keeps the last registration
// of a scheme, so in such a binary which library a plain etcd:// target
// gets depends on the order of the two packages' inits; a rollcall+ scheme
// is registered by this package only. SplitTarget drops the prefix from the
// registry URL.
const SchemePrefix = "rollcall+"

func init() {
	for _, s := range KnownSchemes {
		Register(s)
		Register(SchemePrefix + s)
	}
}

// backendImports names the package to import for each known scheme, for
// error messages.
var backendImports = map[string]string{
	"etcd":   "github.com/rollcall-go/rollcall/backends/etcd",
	"mem":    "github.com/rollcall-go/rollcall/backends/memory",
	"consul": "github.com/rollcall-go/rollcall/backends/consul",
	"nacos":  "github.com/rollcall-go/rollcall/backends/nacos",
	"k8s":    "github.com/rollcall-go/rollcall/backends/k8s",
	"static": "github.com/rollcall-go/rollcall/backends/static",
}

// DefaultServiceConfig is the service config the resolver sends unless
// WithServiceConfig says otherwise: round robin over the instances.
const DefaultServiceConfig = `{"loadBalancingConfig":[{"round_robin":{}}]}`

// DefaultResolveNowInterval is the minimum time between two relists caused by
// gRPC's ResolveNow hints.
const DefaultResolveNowInterval = 5 * time.Second

// lookupTimeout bounds one relist.
const lookupTimeout = 10 * time.Second

// Register registers a builder for scheme, with default options, in gRPC's
// global resolver registry. Like resolver.Register it must be called only
// from an init function. It panics if scheme is empty or not a lower-case
// URL scheme.
func Register(scheme string) {
	resolver.Register(NewBuilder(scheme))
}

// Option configures a builder made by NewBuilder.
type Option func(*options)

type options struct {
	serviceConfig      string
	resolveNowInterval time.Duration
	logger             *slog.Logger
	reg                registry.Registry
	mux                *registry.URLMux
	filters            []func(registry.Instance) bool
}

// WithServiceConfig sets the service config (JSON) sent with every update,
// replacing DefaultServiceConfig. An empty string sends none, so that the
// channel's own default (grpc.WithDefaultServiceConfig, or pick_first)
// applies.
func WithServiceConfig(json string) Option {
	return func(o *options) { o.serviceConfig = json }
}

// WithResolveNowInterval sets the minimum time between two relists caused by
// gRPC's ResolveNow hints (DefaultResolveNowInterval when d <= 0).
func WithResolveNowInterval(d time.Duration) Option {
	return func(o *options) { o.resolveNowInterval = d }
}

// WithLogger sets the logger for the resolver's log lines (slog.Default()
// when nil).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithRegistry makes the builder use r instead of opening registry URLs, for
// a registry made with a backend's typed constructor (etcd.New and the like).
// Targets then have the form scheme:///service. The builder does not close r.
func WithRegistry(r registry.Registry) Option {
	return func(o *options) { o.reg = r }
}

// WithFilter makes the resolvers pass on only the instances for which keep
// returns true, for example registry.MatchMetadata(registry.MetaVersion,
// "v2"). Several filters, and the target's meta. parameters (see Filters),
// must all keep an instance. keep is called from the resolver's goroutine,
// never under a lock, once per instance added or changed; it must not
// block.
func WithFilter(keep func(registry.Instance) bool) Option {
	return func(o *options) { o.filters = append(o.filters, keep) }
}

// WithURLMux makes the builder open registry URLs with m instead of
// registry.DefaultURLMux().
func WithURLMux(m *registry.URLMux) Option {
	return func(o *options) { o.mux = m }
}

// NewBuilder returns a resolver.Builder for targets of scheme, for use with
// grpc.WithResolvers:
//
//	b := grpcresolver.NewBuilder("etcd", grpcresolver.WithServiceConfig(""))
//	conn, err := grpc.NewClient("etcd://127.0.0.1:2379/user.rpc", grpc.WithResolvers(b), ...)
//
// It panics if scheme is empty or not a lower-case URL scheme. The builder is
// safe for concurrent use; the resolvers it builds share one registry per
// registry URL.
func NewBuilder(scheme string, opts ...Option) resolver.Builder {
	if !validScheme(scheme) {
		panic(fmt.Sprintf("grpcresolver: invalid scheme %q (want lower case letters, digits, + - .)", scheme))
	}
	o := options{serviceConfig: DefaultServiceConfig, resolveNowInterval: DefaultResolveNowInterval}
	for _, opt := range opts {
		opt(&o)
	}
	if o.resolveNowInterval <= 0 {
		o.resolveNowInterval = DefaultResolveNowInterval
	}
	if o.logger == nil {
		o.logger = slog.Default()
	}
	if o.mux == nil {
		o.mux = registry.DefaultURLMux()
	}
	return &builder{scheme: scheme, o: o, shared: map[string]*sharedRegistry{}}
}

func validScheme(s string) bool {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

// ErrInvalidTarget wraps every error about the form of a target.
var ErrInvalidTarget = errors.New("grpcresolver: invalid target")

// SplitTarget splits a target URL into the registry URL that registry.Open
// takes and the service name: the last path segment is the service, the
// rest of the path, the host and the query stay with the registry URL,
// except the target's own parameters (meta.KEY=VALUE, see Filters).
//
//	SplitTarget("etcd://h:2379/team-a/user.rpc?ttl=5s&meta.version=v2") = "etcd://h:2379/team-a?ttl=5s", "user.rpc"
//	SplitTarget("rollcall+etcd://h:2379/user.rpc") = "etcd://h:2379", "user.rpc"
func SplitTarget(target string) (registryURL, service string, err error) {
	u, err := url.Parse(target)
	if err != nil {
		return "", "", fmt.Errorf("%w: %q does not parse as a URL", ErrInvalidTarget, registry.Redact(target))
	}
	t, err := splitURL(u)
	return t.regURL, t.service, err
}

// FilterParamPrefix begins the names of a target's own query parameters:
// meta.KEY=VALUE keeps the instances whose metadata KEY is VALUE. Every
// other parameter belongs to the registry URL.
const FilterParamPrefix = "meta."

// target is a parsed target.
type target struct {
	regURL, service string
	filter          func(registry.Instance) bool // from the meta. parameters; nil without any
}

// targetFilter takes the meta. parameters out of u's query, and returns
// the filter they make.
func targetFilter(u *url.URL) (func(registry.Instance) bool, error) {
	if !strings.Contains(u.RawQuery, FilterParamPrefix) {
		return nil, nil // keep the registry's query as it was written
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: query: %v", ErrInvalidTarget, registry.RedactURL(u), err)
	}
	var keys []string
	for k := range q {
		if strings.HasPrefix(k, FilterParamPrefix) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, nil
	}
	slices.Sort(keys)
	var match []func(registry.Instance) bool
	for _, k := range keys {
		key := strings.TrimPrefix(k, FilterParamPrefix)
		if key == "" {
			return nil, fmt.Errorf("%w: %q: parameter %q names no metadata key (want %sKEY=VALUE)", ErrInvalidTarget, registry.RedactURL(u), k, FilterParamPrefix)
		}
		match = append(match, registry.MatchMetadata(key, q[k]...))
	}
	// The registry's parameters stay as written, so that targets that
	// differ only in filters share one registry.
	var kept []string
	for _, kv := range strings.Split(u.RawQuery, "&") {
		k, _, _ := strings.Cut(kv, "=")
		if k, err := url.QueryUnescape(k); err == nil && strings.HasPrefix(k, FilterParamPrefix) {
			continue
		}
		kept = append(kept, kv)
	}
	u.RawQuery = strings.Join(kept, "&")
	return allOf(match), nil
}

// allOf keeps what every one of fs keeps; nil when fs is empty.
func allOf(fs []func(registry.Instance) bool) func(registry.Instance) bool {
	switch len(fs) {
	case 0:
		return nil
	case 1:
		return fs[0]
	}
	return func(in registry.Instance) bool {
		for _, f := range fs {
			if !f(in) {
				return false
			}
		}
		return true
	}
}

func splitURL(u *url.URL) (target, error) {
	r := *u
	filter, err := targetFilter(&r)
	if err != nil {
		return target{}, err
	}
	regURL, service, err := splitPath(&r)
	return target{regURL: regURL, service: service, filter: filter}, err
}

// splitPath splits u into the registry URL and the service name.
func splitPath(u *url.URL) (string, string, error) {
	form := func() error {
		return fmt.Errorf("%w: %q: want the registry URL with the service name as the last path segment, e.g. %s://127.0.0.1:2379/user.rpc",
			ErrInvalidTarget, registry.RedactURL(u), schemeOr(u.Scheme))
	}
	if u.Opaque != "" || u.Scheme == "" {
		return "", "", form()
	}
	i := strings.LastIndexByte(u.Path, '/')
	if i < 0 {
		return "", "", form()
	}
	service := u.Path[i+1:]
	if service == "" {
		return "", "", form()
	}
	if err := registry.ValidateServiceName(service); err != nil {
		return "", "", fmt.Errorf("%w: %q: %w", ErrInvalidTarget, registry.RedactURL(u), err)
	}
	r := *u
	r.Scheme = strings.TrimPrefix(r.Scheme, SchemePrefix)
	r.Path, r.RawPath, r.Fragment, r.RawFragment = u.Path[:i], "", "", ""
	if r.Path == "" && r.Host == "" {
		r.Path = "/" // scheme:///service opens scheme:///, not scheme:
	}
	return r.String(), service, nil
}

func schemeOr(s string) string {
	if s == "" {
		return "etcd"
	}
	return s
}

type builder struct {
	scheme string
	o      options

	mu     sync.Mutex
	shared map[string]*sharedRegistry // by registry URL (may hold credentials: never logged)
}

type sharedRegistry struct {
	key  string
	reg  registry.Registry
	refs int
}

var (
	_ resolver.Builder            = (*builder)(nil)
	_ resolver.AuthorityOverrider = (*builder)(nil)
)

func (b *builder) Scheme() string { return b.scheme }

// OverrideAuthority makes the channel's authority the service name.
func (b *builder) OverrideAuthority(t resolver.Target) string {
	p := t.URL.Path
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		p = p[i+1:]
	}
	if p == "" {
		return t.URL.Host
	}
	return p
}

// Build starts a resolver for target. It does not block on the network.
func (b *builder) Build(t resolver.Target, cc resolver.ClientConn, bo resolver.BuildOptions) (resolver.Resolver, error) {
	u := t.URL
	var (
		reg     registry.Registry
		service string
		filter  func(registry.Instance) bool
		release func()
	)
	if b.o.reg != nil {
		tg, err := splitURL(&u)
		if err != nil {
			return nil, err
		}
		if u.Host != "" || u.Opaque != "" || strings.Count(u.Path, "/") != 1 || strings.Contains(tg.regURL, "?") {
			return nil, fmt.Errorf("%w: %q: this builder uses a registry given to it; want %s:///SERVICE (with only %s parameters)", ErrInvalidTarget, registry.RedactURL(&u), b.scheme, FilterParamPrefix)
		}
		reg, service, filter, release = b.o.reg, tg.service, tg.filter, func() {}
	} else {
		tg, err := splitURL(&u)
		if err != nil {
			return nil, err
		}
		sh, err := b.acquire(tg.regURL)
		if err != nil {
			return nil, fmt.Errorf("grpcresolver: target %q: %w", registry.RedactURL(&u), err)
		}
		reg, service, filter, release = sh.reg, tg.service, tg.filter, func() { b.release(sh) }
	}
	if filter != nil {
		filter = allOf(append(slices.Clip(b.o.filters), filter))
	} else {
		filter = allOf(b.o.filters)
	}
	var sc *serviceConfig
	if b.o.serviceConfig != "" && !bo.DisableServiceConfig {
		pr := cc.ParseServiceConfig(b.o.serviceConfig)
		if pr.Err != nil {
			release()
			return nil, fmt.Errorf("grpcresolver: service config: %w", pr.Err)
		}
		sc = pr
	}
	r, err := newResolver(reg, service, filter, cc, sc, b.o, registry.RedactURL(&u), release)
	if err != nil {
		release()
		return nil, err
	}
	return r, nil
}

// acquire returns the shared registry for regURL, opening it if needed.
// registry.Open does not block on the network.
func (b *builder) acquire(regURL string) (*sharedRegistry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sh := b.shared[regURL]; sh != nil {
		sh.refs++
		return sh, nil
	}
	reg, err := b.o.mux.Open(context.Background(), regURL)
	if err != nil {
		if errors.Is(err, registry.ErrUnknownScheme) {
			scheme, _, _ := strings.Cut(regURL, ":")
			if imp, ok := backendImports[scheme]; ok {
				return nil, fmt.Errorf("%w; link the backend with import _ %q", err, imp)
			}
		}
		return nil, err
	}
	sh := &sharedRegistry{key: regURL, reg: reg, refs: 1}
	b.shared[regURL] = sh
	return sh, nil
}

// release drops one reference and closes the registry with the last one.
func (b *builder) release(sh *sharedRegistry) {
	b.mu.Lock()
	sh.refs--
	last := sh.refs == 0
	if last {
		delete(b.shared, sh.key)
	}
	b.mu.Unlock()
	if last {
		if err := sh.reg.Close(); err != nil {
			b.o.logger.Debug("grpcresolver: closing the registry", "err", err)
		}
	}
}

// openRegistries returns how many registries the builder holds open (tests).
func (b *builder) openRegistries() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.shared)
}
