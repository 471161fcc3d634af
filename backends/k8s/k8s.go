// Package k8s is rollcall's Kubernetes backend, scheme k8s://, over
// k8s.io/client-go. Discovery reads discovery.k8s.io/v1 EndpointSlices, so
// the Services of a cluster are found with no registration at all;
// registration, for processes that are not the pods behind a Service, writes
// EndpointSlices kept alive by a coordination.k8s.io/v1 Lease.
//
// # URL form
//
//	k8s://NAMESPACE?kubeconfig=/path/to/kubeconfig&context=NAME&ttl=10s
//
// NAMESPACE is where services are looked up and registered; when empty
// (k8s:///) it is the namespace of the kubeconfig context, or of the pod's
// service account in a cluster, or "default". Without kubeconfig the
// in-cluster configuration is used (the pod's service account); outside a
// cluster the client falls back, as kubectl does, to $KUBECONFIG and
// ~/.kube/config. context picks a kubeconfig context other than the current
// one. ttl is the registration Lease's duration (default 10s, rounded up to
// whole seconds). Unknown parameters, a port, a path or user information in
// the URL are rejected. Open reads the kubeconfig but does not dial; Ping
// does.
//
// The gRPC target form is the one go-zero users know,
// k8s://NAMESPACE/SERVICE:PORT: the registry URL k8s://NAMESPACE with the
// service name "SERVICE:PORT" as its last path segment.
//
// # Service names
//
// A service name given to Lookup, Watch or Register is "SERVICE:PORT" or
// "SERVICE". SERVICE is the Kubernetes Service name, the value of the
// kubernetes.io/service-name label of its EndpointSlices. PORT selects one
// port of the slices: a number matches the endpoint port number (the port the
// pods listen on, the Service's targetPort, not the Service's own port); a
// name matches the port's name. Without PORT every TCP port of every slice is
// an instance, one per endpoint and port. An endpoint with a nil port number
// ("all ports"), or a slice with no ports at all, is used with a numeric PORT
// only.
//
// # Instances read from EndpointSlices
//
// All slices of a service are merged: each slice adds its endpoints, and one
// slice's update or deletion never removes what another still holds (while
// the EndpointSlice controller moves an endpoint between slices it may be in
// two; the newest slice's copy is used). Only the first address of an endpoint
// is used (the API says they are fungible). IPv4, IPv6 and FQDN slices are
// all read, so a dual-stack Service yields one instance per address family.
//
// For a slice not written by this package, the instance's ID is its
// address, "10.1.2.3:8080"; for IPv6, which an ID cannot hold in brackets,
// the canonical address without them, "fd00::3:8080" (Addr is
// "[fd00::3]:8080"); its metadata has the endpoint's zone under registry.MetaZone, and
// MetaNode, MetaPod, MetaHostname, MetaPortName, MetaHintZones and
// MetaHintNodes when the slice has them.
//
// Registry.Services lists the namespace's services (the service-name labels
// of its EndpointSlices) of which Lookup of SERVICE would find an instance.
//
// Conditions: an endpoint is an instance when it is ready (a nil ready
// condition counts as ready). An endpoint that is not ready but serving and
// terminating is used only while the service (with its port selector) has no
// ready endpoint at all, with MetaTerminating set to "true": as kube-proxy
// does, this keeps traffic flowing to pods that are draining during a rollout
// of the last replicas. Endpoints neither ready nor serving are never used.
//
// # Registration
//
// Register writes one EndpointSlice per instance, labelled
// kubernetes.io/service-name=SERVICE and
// endpointslice.kubernetes.io/managed-by=rollcall.dev (so that the
// EndpointSlice controller leaves it alone; it works with a selector-less
// Service, or with no Service at all), carrying the instance's ID, service
// name and metadata in annotations (AnnotationID, AnnotationService,
// AnnotationMetadata), and an endpoint that is ready, with the address, port
// (named after the service name's PORT, if it has a name) and zone. A
// registered instance is seen with its ID under the service name it was
// registered with, and with the ID "ID:PORTNUMBER" under the other names
// that select it ("SERVICE" for all ports, or "SERVICE:PORTNUMBER"), so that
// one ID registered on two ports of a service gives two instances.
//
// Every slice of one Registry is tied to one Lease (coordination.k8s.io/v1,
// labelled app.kubernetes.io/managed-by=rollcall.dev), which the Registry
// renews every TTL/3 whatever the number of instances: one PATCH of
// spec.renewTime, and one list of its own slices to notice those deleted
// behind its back. The slices are owned by the Lease (ownerReference), so
// that where the garbage collector runs, deleting the Lease deletes them.
// The Lease is created by the first registration and deleted with the last
// withdrawal (a Registry holding no registration renews nothing); a
// withdrawal that cannot delete it fails, and succeeds only once it is
// deleted when repeated (the shared layer repeats it) or by Close. Close
// deletes the Lease first, then its slices, within RequestTimeout.
//
// Each process judges Lease expiry by its own clock and its own contact
// with the API server. A Lease is expired when renewTime +
// leaseDurationSeconds + ClockSkew (1s by default) is in the past, counting
// renewTime as no earlier than the start of this client's unbroken contact
// with the API server: its first answer, and again its first answer after a
// failed call or after a TTL without any answer (an outage it may have
// missed). So a process only counts a Lease expired once it has itself
// seen the server up and the Lease unrenewed for the Lease's duration plus
// ClockSkew; a process started right after an outage lists the Leases its
// registrars have not renewed yet, and drops them only if they stay
// unrenewed, as etcd gives every lease a full TTL after a restart.
//
// A slice whose Lease is missing, has another UID than its
// ownerReference, or is expired is not an instance. Watchers also watch the
// Leases and, when a Lease's expiry time comes, read it again before they
// drop its instances (so that a stalled watch never drops live instances).
//
// Who collects what: a Registry deletes its own Lease and slices when it
// withdraws them or closes. Another process's Lease, and its slices, are
// deleted only by a process that judged that Lease expired as above, after
// reading it again (deleted on its UID and resource version, so a renewal
// meanwhile wins): watchers when its expiry time comes, registrars when
// they create their Lease and every 100 renewals, if their RBAC allows it.
// Slices whose Lease no longer exists (deleted, not expired) are deleted
// by the watchers that list them. The garbage collector is not required.
// The duplicate-ID check of Register trusts the other holder's renewTime
// alone, so a restarted process takes back the IDs of its crashed
// predecessor; it deletes nothing.
//
// Loopback, link-local and unspecified IP addresses are refused by
// Kubernetes in IPv4 and IPv6 slices; an IPv4 address of that kind (useful
// for processes on one host, and in tests) is written in an FQDN-type slice,
// which kube-proxy ignores (FQDN slices are deprecated: the API server warns,
// and the warning is logged at debug level); such an IPv6 address cannot be
// registered. Addresses are written in canonical form.
//
// # Failures
//
// A watch is a list of the service's slices and (if one of them is a
// registered slice) of the Leases, then a watch of each from the listed resource version with bookmarks, relisted (Reset)
// when the server ends it or answers 410 Gone, and at least every Resync.
// While watches are open the backend checks the API server's /readyz every
// HealthInterval (1s), unless a watch event arrived in the meantime; when it
// does not answer within HealthTimeout (3s), or a watch ends with an error,
// every watch fails, and the shared layer keeps the last list (stale) and
// watches again with backoff. A paused API server is therefore noticed
// within about 4s, whatever client-go's HTTP/2 health check settings
// (HTTP2_READ_IDLE_TIMEOUT_SECONDS; 45s by default). An idle watching
// process costs the API server one /readyz a second.
//
// RBAC refusals are returned as *ForbiddenError, naming the verb and the
// resource; credentials the API server refuses (401) as an error naming
// them. Both wrap registry.ErrPermission, never registry.ErrUnavailable: the
// shared layer reports them as they are and retries them only at its
// slowest backoff. Discovering plain Services needs get, list and watch on
// endpointslices only (deploy/rbac/service-discovery.yaml): Leases are read
// only when a listed slice was written by a rollcall registrar. When RBAC
// forbids reading them, such slices are taken as they are (their endpoints'
// conditions), without checking that their Lease is renewed: a crashed
// registrar's instances stay listed until a process allowed to collect them
// does (one warning per Registry says so), and discovery never fails for
// it. Checking registered instances needs get, list and watch on leases too
// (deploy/rbac/discovery.yaml; delete on both to clean up expired
// registrations, optional); registration needs create, get, list, update,
// patch and delete on both.
//
// Logging: the backend logs to Options.Logger. client-go's own logs (klog,
// process-global) are left alone unless Options.RouteClientGoLogs asks for
// them to go to the Logger too.
//
// A Registry is safe for concurrent use.
package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "k8s"

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

// Options configure a Kubernetes Registry.
type Options struct {
	// Namespace where services are looked up and registered; "default"
	// when empty.
	Namespace string
	// TTL is the registration Lease's duration, rounded up to whole
	// seconds; driver.DefaultTTL when zero. The Lease is renewed every
	// TTL/3.
	TTL time.Duration
	// ClockSkew is added to a Lease's expiry time before it counts as
	// expired, to allow for clocks that differ between registrars and
	// discoverers; 1s when zero.
	ClockSkew time.Duration
	// RequestTimeout bounds each list and get made in the background; 5s
	// when zero.
	RequestTimeout time.Duration
	// HealthInterval and HealthTimeout: while a watch is open, the API
	// server's /readyz is checked every HealthInterval (1s when zero), and
	// open watches fail when it does not answer within HealthTimeout (3s
	// when zero).
	HealthInterval, HealthTimeout time.Duration
	// Resync is the longest a watch goes without relisting (the watch
	// requests' server-side timeout); 5m when zero.
	Resync time.Duration
	// Identity is written as the Lease's holderIdentity; the host name and
	// process ID when empty.
	Identity string
	// Logger receives the backend's log lines; slog.Default() when nil.
	Logger *slog.Logger
	// RouteClientGoLogs also sends client-go's own log lines (klog) to
	// Logger. klog is process-global: with it, every klog line of the
	// process (an application that is itself a controller, its other
	// clients) goes to the Logger of the most recently created Registry
	// that set it. Off, klog is left as the application configured it.
	RouteClientGoLogs bool
	// Registry configures the shared layer. Its Logger defaults to Logger.
	Registry registry.Options
}

// New returns a Registry over a clientset the caller holds, in
// opts.Namespace. Close does not close the clientset's connections.
func New(cs kubernetes.Interface, opts *Options) (registry.Registry, error) {
	if cs == nil {
		return nil, errors.New("k8s: New with nil clientset")
	}
	return newRegistry(cs, nil, opts)
}

// NewForConfig returns a Registry with a client of its own made from cfg, in
// opts.Namespace. Close closes that client's connections.
func NewForConfig(cfg *rest.Config, opts *Options) (registry.Registry, error) {
	if cfg == nil {
		return nil, errors.New("k8s: NewForConfig with nil config")
	}
	var logger *slog.Logger
	if opts != nil {
		logger = opts.Logger
	}
	cs, own, err := clientFor(cfg, logger)
	if err != nil {
		return nil, err
	}
	r, err := newRegistry(cs, own, opts)
	if err != nil {
		own.close()
	}
	return r, err
}

// ownClient is the HTTP client and connections of a clientset the backend
// made, to close with it.
type ownClient struct {
	hc    *http.Client
	conns *connTracker
}

func (o *ownClient) close() {
	if o == nil {
		return
	}
	utilnet.CloseIdleConnectionsFor(o.hc.Transport)
	o.conns.closeAll()
}

// clientFor makes a clientset with an HTTP client of its own (not shared
// through client-go's transport cache), so that Close can close its
// connections.
func clientFor(cfg *rest.Config, logger *slog.Logger) (*kubernetes.Clientset, *ownClient, error) {
	cfg = rest.CopyConfig(cfg)
	if cfg.WarningHandler == nil && cfg.WarningHandlerWithContext == nil {
		if logger == nil {
			logger = slog.Default()
		}
		cfg.WarningHandler = warningLogger{logger}
	}
	if cfg.Proxy == nil {
		// A Proxy func makes the transport uncacheable: ours alone.
		cfg.Proxy = http.ProxyFromEnvironment
	}
	conns := newConnTracker(cfg.Dial)
	cfg.Dial = conns.Dial
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 100, 200
	}
	if cfg.UserAgent == "" {
		cfg.UserAgent = "rollcall (" + rest.DefaultKubernetesUserAgent() + ")"
	}
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("k8s: client: %w", err)
	}
	own := &ownClient{hc: hc, conns: conns}
	cs, err := kubernetes.NewForConfigAndClient(cfg, hc)
	if err != nil {
		own.close()
		return nil, nil, fmt.Errorf("k8s: client: %w", err)
	}
	return cs, own, nil
}

func badURL(u *url.URL, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s (form: k8s://namespace?kubeconfig=path&context=name&ttl=10s)",
		registry.ErrInvalidURL, registry.RedactURL(u), fmt.Sprintf(format, args...))
}

func openURL(ctx context.Context, u *url.URL) (registry.Registry, error) {
	p := registry.NewURLParams(u)
	ttl := p.Duration("ttl", driver.DefaultTTL)
	kubeconfig := p.String("kubeconfig", "")
	kctx := p.String("context", "")
	if err := p.Err(); err != nil {
		return nil, err
	}
	if u.Opaque != "" {
		return nil, badURL(u, "not a k8s:// URL")
	}
	if u.User != nil {
		return nil, badURL(u, "credentials do not go in the URL; use a kubeconfig")
	}
	if u.Port() != "" {
		return nil, badURL(u, "the host part is a namespace, not host:port")
	}
	if u.Path != "" && u.Path != "/" {
		return nil, badURL(u, "no path expected (k8s://namespace/service:port is a gRPC target; open k8s://namespace and look up service:port)")
	}
	ns := u.Hostname()
	if ns != "" {
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return nil, badURL(u, "namespace %q: %s", ns, errs[0])
		}
	}
	cfg, defNS, err := loadConfig(kubeconfig, kctx)
	if err != nil {
		return nil, badURL(u, "%v", err)
	}
	if ns == "" {
		ns = defNS
	}
	return NewForConfig(cfg, &Options{Namespace: ns, TTL: ttl})
}

// warningLogger logs the API server's warnings (such as "FQDN endpoints are
// deprecated" for the slices of loopback addresses) at debug level.
type warningLogger struct{ l *slog.Logger }

func (w warningLogger) HandleWarningHeader(code int, agent, text string) {
	w.l.Debug("k8s: API server warning", "warning", text)
}

const inClusterNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// loadConfig returns the client configuration and its default namespace:
// the kubeconfig given, else the in-cluster configuration, else kubectl's
// default loading rules.
func loadConfig(kubeconfig, context string) (*rest.Config, string, error) {
	if kubeconfig == "" && context == "" {
		if cfg, err := rest.InClusterConfig(); err == nil {
			ns := "default"
			if b, err := os.ReadFile(inClusterNamespaceFile); err == nil && strings.TrimSpace(string(b)) != "" {
				ns = strings.TrimSpace(string(b))
			}
			return cfg, ns, nil
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		if _, err := os.Stat(kubeconfig); err != nil {
			return nil, "", fmt.Errorf("kubeconfig: %w", err)
		}
		rules = &clientcmd.ClientConfigLoadingRules{ExplicitPath: kubeconfig}
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: context})
	cfg, err := cc.ClientConfig()
	if err != nil {
		if kubeconfig == "" && context == "" {
			return nil, "", fmt.Errorf("not in a cluster, and no kubeconfig: %w", err)
		}
		return nil, "", fmt.Errorf("kubeconfig: %w", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil || ns == "" {
		ns = "default"
	}
	return cfg, ns, nil
}

// kubeRegistry is the registry.Registry returned by New, NewForConfig and
// Open; tests reach the backend through it.
type kubeRegistry struct {
	registry.Registry
	b *backend
}

// Unwrap returns the shared layer's Registry, for registry.Open.
func (r *kubeRegistry) Unwrap() registry.Registry { return r.Registry }

func newRegistry(cs kubernetes.Interface, own *ownClient, opts *Options) (registry.Registry, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	if errs := validation.IsDNS1123Label(o.Namespace); len(errs) > 0 {
		return nil, fmt.Errorf("k8s: namespace %q: %s", o.Namespace, errs[0])
	}
	if o.TTL <= 0 {
		o.TTL = driver.DefaultTTL
	}
	if o.ClockSkew <= 0 {
		o.ClockSkew = time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 5 * time.Second
	}
	if o.HealthInterval <= 0 {
		o.HealthInterval = time.Second
	}
	if o.HealthTimeout <= 0 {
		o.HealthTimeout = 3 * time.Second
	}
	if o.Resync <= 0 {
		o.Resync = 5 * time.Minute
	}
	if o.Identity == "" {
		host, _ := os.Hostname()
		o.Identity = fmt.Sprintf("%s_%d", host, os.Getpid())
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry.Logger == nil {
		o.Registry.Logger = o.Logger
	}
	if o.RouteClientGoLogs {
		routeKlog(o.Logger)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &backend{
		cs: cs, own: own, ns: o.Namespace, opts: o,
		log: o.Logger.With("backend", Scheme, "namespace", o.Namespace),
		ctx: ctx, cancel: cancel,
		pubs:     map[[2]string]*publication{},
		retiring: map[*session]struct{}{},
		gcBusy:   map[string]bool{},
		streams:  map[*stream]struct{}{},
	}
	return &kubeRegistry{Registry: registry.New(b, &o.Registry), b: b}, nil
}

// backend implements driver.Backend over a clientset.
type backend struct {
	cs   kubernetes.Interface
	own  *ownClient // ours to close, or nil
	ns   string
	opts Options
	log  *slog.Logger

	ctx    context.Context // canceled by Close and crash
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the backend

	leaseWarned atomic.Bool // the warning that RBAC forbids reading Leases was logged

	sessMu sync.Mutex // held while creating a Lease; never under mu

	mu       sync.Mutex // never held while calling the API server
	closed   bool
	crashed  bool
	sess     *session
	retiring map[*session]struct{} // out of use; Lease not yet deleted
	pubs     map[[2]string]*publication
	gcBusy   map[string]bool // Lease or slice names being garbage-collected
	down     bool            // the API server did not answer the last call
	answered time.Time       // when it last answered
	upSince  time.Time       // since when it has answered with no break (see noteUp)
	streams  map[*stream]struct{}
	checking bool // the health loop runs

	heard atomic.Int64 // when a watch event last arrived, Unix ns
}

var (
	_ driver.Backend     = (*backend)(nil)
	_ driver.Pinger      = (*backend)(nil)
	_ driver.Publication = (*publication)(nil)
	_ driver.Stream      = (*stream)(nil)
)

// goFunc runs f on a goroutine owned by the backend, unless it is closed.
func (b *backend) goFunc(f func()) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.ctx.Err() != nil {
		return false
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		f()
	}()
	return true
}

// noteDown records that the API server did not answer.
func (b *backend) noteDown() {
	b.mu.Lock()
	b.down = true
	b.mu.Unlock()
}

// noteUp records that the API server answered. The first answer of this
// client, the first after the server did not answer, and the first after a
// TTL without an answer (an outage this client may have missed) start a
// grace for every Lease: this client has not seen them unrenewed while the
// server was up (see deadline).
func (b *backend) noteUp() {
	now := time.Now()
	b.mu.Lock()
	last := time.Unix(0, b.heard.Load()) // a watch event
	if b.answered.After(last) {
		last = b.answered
	}
	if b.down || now.Sub(last) > b.opts.TTL {
		b.upSince = now
	}
	b.down, b.answered = false, now
	b.mu.Unlock()
}

func (b *backend) graceBase() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.upSince
}

func (b *backend) isCrashed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.crashed
}

var errCrashed = errors.New("k8s: client crashed")

// crash stops the backend as a crashed process stops: no renewals, nothing
// deleted. For tests.
func (b *backend) crash() {
	b.mu.Lock()
	b.crashed = true
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
}

func (b *backend) Ping(ctx context.Context) error {
	var one int64 = 1
	_, err := b.cs.DiscoveryV1().EndpointSlices(b.ns).List(ctx, listOptions("", &one))
	if err == nil {
		b.noteUp()
	}
	return b.wrap(ctx, "list", resSlices, err)
}

// Close deletes the Lease and whatever slices are still tied to it (and
// the Leases of withdrawals that could not delete theirs), stops every
// goroutine, and closes the connections of a client of its own. The
// deletions get one RequestTimeout in all: Close comes after the shared
// layer spent its CloseTimeout withdrawing, and what it cannot delete
// expires with its Lease.
func (b *backend) Close() error {
	b.mu.Lock()
	crashed := b.crashed
	var left []*session
	if b.sess != nil {
		left = append(left, b.sess)
	}
	for ss := range b.retiring {
		left = append(left, ss)
	}
	b.sess = nil
	b.retiring = map[*session]struct{}{}
	b.closed = true
	b.mu.Unlock()
	var errs []error
	if !crashed && len(left) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), b.opts.RequestTimeout)
		for _, ss := range left {
			errs = append(errs, b.revoke(ctx, ss))
		}
		cancel()
	}
	b.cancel()
	b.wg.Wait()
	b.own.close()
	return errors.Join(errs...)
}
