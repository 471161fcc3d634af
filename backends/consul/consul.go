// Package consul is rollcall's Consul backend, scheme consul://, over
// github.com/hashicorp/consul/api.
//
// # URL form
//
//	consul://HOST:PORT/[PREFIX]?ttl=10s&dc=dc1&token=SECRET
//	consul://HOST:8501/?tls=true&ca=/etc/consul/ca.pem&cert=c.pem&key=k.pem
//	consul://USER:PASSWORD@HOST:PORT/   (HTTP basic auth, for an agent behind a proxy)
//
// HOST:PORT is the HTTP API of a Consul agent (normally the local one); the
// port defaults to 8500, or 8501 with TLS. An empty host means the agent named
// by CONSUL_HTTP_ADDR, or localhost:8500: settings not given in the URL fall
// back, as in the consul command, to the CONSUL_HTTP_* environment variables
// read by the consul api package (CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...),
// except CONSUL_HTTP_SSL: the URL's tls parameter decides. The path is empty,
// "/", or a prefix (see Prefixes below). Parameters (any other is rejected):
//
//	ttl                   TTL of the session's check (default 10s)
//	dc                    datacenter for discovery (default: the agent's)
//	token                 ACL token; never appears in errors or logs
//	token_file            file holding the ACL token
//	tls                   true: talk HTTPS (implied by ca, ca_path, cert)
//	ca, ca_path           CA certificate file, or directory of them
//	cert, key             client certificate and key files, for mutual TLS
//	ca_file, cert_file,   aliases of ca, cert and key, as Consul spells them
//	key_file              (etcd:// URLs take ca, cert and key); give one spelling
//	server_name           TLS server name (default: HOST)
//	insecure_skip_verify  true: do not verify the agent's certificate
//	wait                  wait time of the blocking queries (default ttl/2, between 1s and 5s; see Watch)
//	deregister_after      DeregisterCriticalServiceAfter of the checks (default max(1m, 3*ttl))
//
// Open does not connect; registry.Registry.Ping does. New takes a client the
// caller already holds.
//
// # Prefixes
//
// Consul's open-source edition has no namespaces. A Registry opened with a
// path, consul://HOST:PORT/team-a, or with Options.Prefix "team-a", puts every
// service it registers or reads under the Consul service name
// "team-a/SERVICE" (its session too: "team-a/rollcall-session"), so that
// Registries with different prefixes never see each other's instances, also
// when one prefix is a prefix of the other ("team-a" and "team-ab"), and an
// ACL policy can grant a team service_prefix "team-a/". A Registry without a
// prefix sees none of them: '/' is not allowed in rollcall service names.
// Each '/'-separated segment of a prefix is a valid service name. A gRPC
// target consul://HOST:PORT/team-a/user.rpc resolves user.rpc in team-a.
// Such names are not discoverable through Consul's DNS interface (nor are
// names with '.' or '_'). Registry.Services lists the catalog's services of
// the prefix, without the heartbeat service, and without those whose
// checked instances are all critical (see Services).
//
// # Registration
//
// A Registry that registers instances holds one session, as an etcd client
// holds one lease: a heartbeat service "rollcall-session" (ID
// "rollcall-session~RANDOM", Meta pid and host) with a TTL check whose status
// is passing. Each instance is an agent service registration whose only check
// is an alias check of that heartbeat (initially passing, its check ID names
// the session), so it is passing exactly while the heartbeat is. One renewal
// loop renews the heartbeat's TTL check every TTL/3 and, before that, reads
// the agent's TTL and alias checks: two requests per TTL/3 however many
// instances the Registry holds (a TTL check per instance would cost one
// request, and on a server agent one fsync, per instance and per round). The
// agent answers a registration before it has synced it to the catalog, which
// List and Watch read: Register (and Update) return once the catalog lists
// the instance as registered, which a blocking query on it tells within
// milliseconds. Before it writes, Register reads what holds the instance
// already (see Duplicate IDs). The rounds start TTL/3 apart however long
// each takes. The agent applies service writes and TTL renewals one at a time
// under one lock, each persisted to disk, so a burst of registrations would
// queue the renewals behind it: a Registry keeps at most two service writes
// in flight to its agent, and its renewals do not wait for them (a burst of
// 1000 writes by four Registries on one agent: renewals took 131 ms at the
// median instead of 274 ms, 0.34 s at most instead of timing out at TTL/3).
// A renewal that fails is retried before the next round is due (at once after
// a timeout, with a backoff from 100ms after a quick failure), and the first
// renewal after a failure renews before it reads, so that an agent that comes
// back from a pause or a partition finds its session renewed within moments:
// a TTL that lapsed only because the agent could not hear the registrar is not
// treated as a loss.
//
// The registrations are lost, and package registry registers them again,
// when the agent no longer knows the session's check (the agent restarted
// without its data, reaped the session, or someone deregistered it) or finds
// it critical outside an outage (its TTL lapsed while the process was
// stalled, or someone failed it); one registration alone is lost when its
// service is gone from the agent (someone deregistered it) or another
// registrar took it over (see Duplicate IDs), or its alias check stays
// critical for two rounds while the session's check passes (Consul's alias
// checks are edge-triggered, with a refresh once a minute, and one started by
// an agent restart can miss the session's edge: registering it again
// restarts it; ErrCheckStuck). A renewal the ACLs refuse loses
// the session with registry.ErrPermission. Deregister removes the service from
// the agent at once, unless another registrar holds it by then, and returns
// once the catalog no longer lists it (as Register returns once it does); it
// may be repeated after it failed. Close removes the session, or fails its check if
// a withdrawal failed, so that what is left is critical at once (the agent
// does not re-evaluate an alias check when its aliased service goes; a lost
// session is failed, not removed, for the same reason, and Consul reaps it
// after deregister_after). A crashed process stops
// renewing: after one TTL its session, and with it every alias check, turns
// critical, which removes its instances from every watcher; the agent reaps
// them after deregister_after (Consul reaps every 30 s or so, with a minimum
// of one minute, so this is only cleanup).
//
// # Duplicate IDs
//
// Consul service IDs are unique per agent, not per cluster, so "another live
// registrar" of an instance (service and ID) is one of:
//
//   - another Registry, in this or another process, whose registration of the
//     same instance on the same agent is passing (its session is renewed);
//     registering would overwrite it;
//   - a registration of the same Consul service ID on another node that is
//     passing; registering would add a second entry with the same instance ID.
//
// Register fails with registry.ErrConflict, and writes nothing, when such a
// registrar holds the instance at a different address. At the same address it
// is the same endpoint (typically a restarted process whose old session has
// not expired yet) and on the same agent it is taken over. The registrar
// whose registration was taken over finds out at its next renewal, reports
// registry.ErrConflict in its Status, and takes the instance back only once
// the holder's registration is no longer passing: two live registrars of one
// instance settle on one owner, with no write loop. The checks are a read
// before the write: two registrars that register the same instance at the same
// moment can both succeed; on one agent the renewals then settle it, across
// nodes both entries stay (with the same address, or until one expires).
//
// # ACLs
//
// With ACLs enabled, the token needs service:write on the services it
// registers and on "rollcall-session" (with a prefix: PREFIX/...), and
// service:read on the services it watches, with node:read on their nodes
// (Consul drops the instances of nodes the token may not read). A refusal
// (403 Permission denied or ACL not found, or 401 from a proxy) wraps
// registry.ErrPermission, never registry.ErrUnavailable: Register, renewals,
// Lookup, Watch and Ping report it. Consul filters what a token may not read
// instead of refusing it: when it says it dropped every instance
// (X-Consul-Results-Filtered-By-ACLs) the answer is ErrFilteredByACLs, and an
// empty answer is delivered only after the agent confirmed that the token may
// read the service (GET /v1/agent/health/service/name/SERVICE, which refuses
// a token without service:read): an empty list is never made of a refusal.
// Ping checks that the agent answers, that the cluster has a leader and that
// the agent knows the token; rights are per service, so a known token that
// may do nothing passes Ping and is refused by Register, Lookup and Watch.
//
// # Mapping
//
// An Instance maps onto an agent service registration as follows:
//
//	Service              Name (with the prefix, if any). Consul treats service
//	                     names case-insensitively.
//	ID                   ID = Name + "~" + ID ('~' is in neither name, and
//	                     service IDs must be unique per agent). Read back with
//	                     the "Name~" prefix removed; a service registered by
//	                     another tool keeps its own ID.
//	Addr                 Address and Port. Read back from the service address,
//	                     or the node's address when the service has none.
//	Metadata["weight"]   Weights.Passing (Warning is 1). Read back from
//	                     Weights.Passing, as Metadata["weight"] only when it is
//	                     above 1 (1 is the default weight), capped at
//	                     registry.MaxWeight; a "weight" key in Meta is ignored.
//	other Metadata       Meta, verbatim. Consul limits keys to letters, digits,
//	                     '_' and '-', at most 128 bytes and not starting with
//	                     "consul-", and values to 512 bytes: other metadata is
//	                     refused with registry.ErrInvalidInstance.
//	zone, version        also the Tags "zone=Z" and "version=V", for tag
//	                     filters and the UI. When reading, such tags fill zone
//	                     and version if Meta has none (registrations by other
//	                     tools).
//
// Entries that other tools wrote and that are not valid instances (no port,
// IDs with other characters, ...) are logged and skipped by package registry.
//
// # Watch
//
// Lookup and Watch read the health endpoint with passing entries only, so an
// instance whose check turned critical disappears at once, long before Consul
// reaps it. They ask with near=_agent, which keeps them off a client agent's
// streaming backend: its local view answers as if fresh while the servers
// have no leader, or while the one server it subscribed to is frozen; a
// plain blocking query is forwarded to the leader and fails without one. A watch is a loop of blocking queries; each answer is the full
// list and is delivered as a reset, which package registry diffs. The index
// rules of Consul's documentation are kept: an answer whose index went
// backwards is not delivered (the agent's view was reset: a restarted server,
// or a streaming view that lost its subscription, which answers an empty list
// at index 1) and the list is read again with index 0; the index is never
// used below 1; and a query that returns early without progress is followed
// by a growing pause, so that no loop of requests hammers an agent. Every
// request carries a deadline: a blocking query waits at most wait (plus
// Consul's jitter of wait/16) and its deadline is one second later, so a watch
// fails, and its watcher reports stale, within about wait + 1.1 s of the agent
// stopping to answer. That is why wait defaults to half the TTL (between 1s
// and 5s): a pause of the agent long enough for the TTL checks of registrars
// configured like this one to lapse also ends the watch, and package
// registry's resync grace then hides the moment in which they are critical
// before their registrars renew them. A watch of a quiet service makes about
// 60/wait requests a minute. Errors end the watch; package registry reopens it
// with backoff.
package consul

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "consul"

// Defaults.
const (
	// DefaultWaitTime is the longest default wait time of blocking queries:
	// the default is half the TTL, between one second and this.
	DefaultWaitTime = 5 * time.Second
	// minDefaultWait is the shortest default wait time.
	minDefaultWait = time.Second
	// DefaultRequestTimeout bounds requests whose context has no earlier
	// deadline.
	DefaultRequestTimeout = 10 * time.Second
	// minDeregisterAfter is Consul's minimum for DeregisterCriticalServiceAfter.
	minDeregisterAfter = time.Minute
	// closeTimeout bounds the removal of the session by Close.
	closeTimeout = 2 * time.Second
)

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

func invalidURL(u *url.URL, format string, args ...any) error {
	return fmt.Errorf("%w: %s: consul: %s (form: consul://host:port/[prefix]?ttl=10s&token=...)",
		registry.ErrInvalidURL, registry.RedactURL(u), fmt.Sprintf(format, args...))
}

func openURL(_ context.Context, u *url.URL) (registry.Registry, error) {
	p := registry.NewURLParams(u)
	var o Options
	o.TTL = p.Duration("ttl", driver.DefaultTTL)
	o.WaitTime = p.Duration("wait", 0)
	if u.Query().Has("wait") && o.WaitTime <= 0 {
		return nil, invalidURL(u, "wait must be positive")
	}
	o.DeregisterAfter = p.Duration("deregister_after", 0)
	dc := p.String("dc", "")
	token := p.String("token", "")
	tokenFile := p.String("token_file", "")
	useTLS := p.Bool("tls", false)
	tlsSet := u.Query().Has("tls")
	// ca, cert and key, as etcd:// spells them, or ca_file, cert_file and
	// key_file, as Consul does.
	var spelled []string
	file := func(name, alias string) string {
		v, a := p.String(name, ""), p.String(alias, "")
		if v != "" && a != "" {
			spelled = append(spelled, name+" and "+alias)
		}
		return v + a
	}
	tc := api.TLSConfig{
		CAFile:             file("ca", "ca_file"),
		CAPath:             p.String("ca_path", ""),
		CertFile:           file("cert", "cert_file"),
		KeyFile:            file("key", "key_file"),
		Address:            p.String("server_name", ""),
		InsecureSkipVerify: p.Bool("insecure_skip_verify", false),
	}
	if err := p.Err(); err != nil {
		return nil, err
	}
	if len(spelled) > 0 {
		return nil, invalidURL(u, "%s are one parameter: give one", spelled[0])
	}
	if u.Opaque != "" || u.Fragment != "" {
		return nil, invalidURL(u, "no fragment allowed")
	}
	if p := strings.TrimPrefix(u.Path, "/"); p != "" {
		if err := ValidatePrefix(p); err != nil {
			return nil, invalidURL(u, "%v", err)
		}
		o.Prefix = p
	}
	if strings.Contains(u.Host, ",") {
		return nil, invalidURL(u, "one agent address only")
	}
	if o.DeregisterAfter != 0 && o.DeregisterAfter < minDeregisterAfter {
		return nil, invalidURL(u, "deregister_after must be at least %v (Consul's minimum)", minDeregisterAfter)
	}
	if (tc.CertFile == "") != (tc.KeyFile == "") {
		return nil, invalidURL(u, "cert and key (cert_file and key_file) go together")
	}
	implied := tc.CAFile != "" || tc.CAPath != "" || tc.CertFile != "" || tc.Address != "" || tc.InsecureSkipVerify
	if tlsSet && !useTLS && implied {
		return nil, invalidURL(u, "tls=false contradicts the TLS parameters")
	}
	useTLS = useTLS || implied
	scheme, defPort := "http", "8500"
	if useTLS {
		scheme, defPort = "https", "8501"
	}
	addr := u.Host
	if addr != "" && u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), defPort)
	}
	tr := newTransport()
	cfg := &api.Config{
		Address:    addr,
		Scheme:     scheme,
		Datacenter: dc,
		Token:      token,
		TokenFile:  tokenFile,
		Transport:  tr,
		TLSConfig:  tc,
	}
	if u.User != nil {
		pw, _ := u.User.Password()
		cfg.HttpAuth = &api.HttpBasicAuth{Username: u.User.Username(), Password: pw}
	}
	cli, err := api.NewClient(cfg)
	if err != nil {
		// The api's errors name files, never the token.
		return nil, fmt.Errorf("%w: %s: consul: %v", registry.ErrInvalidURL, registry.RedactURL(u), err)
	}
	b := newBackend(cli, &o)
	b.ownTransport = tr
	return registry.New(b, &b.opts.Registry), nil
}

// newTransport returns the HTTP transport of clients made from URLs: pooled,
// with enough idle connections per host for many watches (each blocking query
// holds one connection).
func newTransport() *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// Clone fills in a TLS config; the consul api builds its own (from the
	// TLS parameters) only when there is none.
	tr.TLSClientConfig = nil
	tr.MaxIdleConnsPerHost = 64
	tr.IdleConnTimeout = 90 * time.Second
	return tr
}

// Options configure a Consul Registry.
type Options struct {
	// TTL of the session's TTL check; driver.DefaultTTL when zero.
	// It is renewed every TTL/3.
	TTL time.Duration
	// Prefix, when not empty, scopes the Registry: every service name S is
	// the Consul service "Prefix/S" (see Prefixes in the package doc). Each
	// '/'-separated segment must be a valid service name (ValidatePrefix).
	Prefix string
	// DeregisterAfter is the checks' DeregisterCriticalServiceAfter: the agent
	// removes a service whose check has been critical this long. Zero means
	// max(1m, 3*TTL); Consul's minimum is one minute.
	DeregisterAfter time.Duration
	// WaitTime is the wait time of each blocking query; when zero, half the
	// TTL, between one second and DefaultWaitTime. It also bounds how long a
	// watch takes to notice an agent that stopped answering (about WaitTime
	// + 1.1s).
	WaitTime time.Duration
	// RequestTimeout bounds each other request whose context has no earlier
	// deadline; DefaultRequestTimeout when zero.
	RequestTimeout time.Duration
	// Logger receives the backend's log lines, and the registry's when
	// Registry.Logger is nil; slog.Default() when nil.
	Logger *slog.Logger
	// Registry configures the shared layer (backoff, timeouts).
	Registry registry.Options
}

// ValidatePrefix reports whether p may be used as Options.Prefix: one or
// more valid service names joined by '/'.
func ValidatePrefix(p string) error {
	for _, seg := range strings.Split(p, "/") {
		if err := registry.ValidateServiceName(seg); err != nil {
			return fmt.Errorf("prefix %q: segment %q: %w", p, seg, err)
		}
	}
	return nil
}

// New returns a Registry over cli, a client of a Consul agent. It does not
// connect. The Registry does not close cli's idle connections when it is
// closed: cli belongs to the caller. It panics if cli is nil or
// opts.Prefix is not valid (see ValidatePrefix).
func New(cli *api.Client, opts *Options) registry.Registry {
	if cli == nil {
		panic("consul: New with a nil client")
	}
	if opts != nil && opts.Prefix != "" {
		if err := ValidatePrefix(opts.Prefix); err != nil {
			panic("consul: New: " + err.Error())
		}
	}
	b := newBackend(cli, opts)
	return registry.New(b, &b.opts.Registry)
}

func newBackend(cli *api.Client, opts *Options) *backend {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.TTL <= 0 {
		o.TTL = driver.DefaultTTL
	}
	if o.WaitTime <= 0 {
		o.WaitTime = min(DefaultWaitTime, max(minDefaultWait, o.TTL/2))
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.DeregisterAfter <= 0 {
		o.DeregisterAfter = max(minDeregisterAfter, 3*o.TTL)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry.Logger == nil {
		o.Registry.Logger = o.Logger
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &backend{
		c: cli, opts: o, ttl: o.TTL, reap: o.DeregisterAfter, wait: o.WaitTime, log: o.Logger,
		ctx: ctx, cancel: cancel, pubs: map[string]*publication{}, takenOver: map[string]bool{},
		writes: make(chan struct{}, maxWrites),
	}
	if o.Prefix != "" {
		b.prefix = o.Prefix + "/"
	}
	return b
}

type backend struct {
	c            *api.Client
	opts         Options
	ttl, reap    time.Duration
	wait         time.Duration
	log          *slog.Logger
	ownTransport *http.Transport // closed with the backend when it made it
	prefix       string          // Options.Prefix + "/", or empty

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	sessMu sync.Mutex    // held while registering a session; never under mu
	writes chan struct{} // a slot per agent write in flight (see write)

	mu       sync.Mutex // never held during a request
	closed   bool
	renewing bool                    // the renewal loop runs
	sess     *session                // the current session, nil before the first
	pubs     map[string]*publication // by Consul service ID
	// takenOver holds the Consul service IDs of publications that another
	// live registrar took over on this agent: they are taken back only once
	// that registrar's registration is no longer passing.
	takenOver map[string]bool
	// abandoned counts the publications whose Publish failed after their
	// registration was sent and whose removal from the agent has not been
	// confirmed yet (see abandon).
	abandoned int
}

var (
	_ driver.Backend     = (*backend)(nil)
	_ driver.Pinger      = (*backend)(nil)
	_ driver.Publication = (*publication)(nil)
	_ driver.Stream      = (*stream)(nil)
)

var errClosed = fmt.Errorf("consul: backend closed: %w", registry.ErrClosed)

// bound returns ctx with the request timeout applied unless ctx ends sooner,
// canceled too when the backend closes.
func (b *backend) bound(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, d)
	stop := context.AfterFunc(b.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// wrap turns a request error into the backend's error. The caller's context
// errors pass through unchanged; answers of the agent keep their status
// (api.StatusError): refusals (403, and 401 from a proxy) wrap
// registry.ErrPermission, server errors registry.ErrUnavailable; anything
// else (no connection, no answer in time) wraps registry.ErrUnavailable and
// the cause.
func (b *backend) wrap(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	if b.ctx.Err() != nil {
		return errClosed
	}
	var se api.StatusError
	if errors.As(err, &se) {
		if se.Code >= 500 || se.Code == http.StatusTooManyRequests {
			return fmt.Errorf("consul: %s: %w: %w", op, registry.ErrUnavailable, err)
		}
		if se.Code == http.StatusForbidden || se.Code == http.StatusUnauthorized {
			return fmt.Errorf("consul: %s: refused by the agent: %w: %w", op, registry.ErrPermission, err)
		}
		if se.Code == http.StatusBadRequest && op == "register" {
			return fmt.Errorf("consul: %s: %w: %w", op, registry.ErrInvalidInstance, err)
		}
		return fmt.Errorf("consul: %s: %w", op, err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("consul: %s: the agent did not answer in time: %w: %w", op, registry.ErrUnavailable, err)
	}
	return fmt.Errorf("consul: %s: %w: %w", op, registry.ErrUnavailable, err)
}

func isStatus(err error, code int) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == code
}

func (b *backend) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// name returns the Consul service name of a rollcall service.
func (b *backend) name(service string) string { return b.prefix + service }

// health runs one health query for the passing instances of service. With
// index 0 it returns at once; otherwise it blocks up to b.wait for a change
// after index. stop, when not nil, cancels the request too.
func (b *backend) health(ctx context.Context, stop context.Context, service string, index uint64) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	// Consul adds up to wait/16 of jitter to a blocking query.
	qctx, cancel := b.bound(ctx, b.wait+b.wait/16+time.Second)
	defer cancel()
	if stop != nil {
		defer context.AfterFunc(stop, cancel)()
	}
	// near=_agent keeps the blocking queries off the client agent's
	// streaming backend (the default since Consul 1.10), which answers them
	// from a local view fed by one server's subscription: that view cannot
	// fail, so a watch over it stays fresh while the servers have lost
	// quorum, and stops changing, unnoticed, while its server is frozen.
	// Without it a blocking query is an RPC that the servers forward to the
	// leader, which fails without one and times out with a frozen server.
	q := &api.QueryOptions{WaitIndex: index, WaitTime: b.wait, Near: "_agent"}
	entries, meta, err := b.c.Health().Service(b.name(service), "", true, q.WithContext(qctx))
	if err != nil {
		if stop != nil && stop.Err() != nil && ctx.Err() == nil {
			return nil, nil, errStreamClosed
		}
		return nil, nil, b.wrap(ctx, "health query for "+service, err)
	}
	if meta == nil {
		meta = &api.QueryMeta{}
	}
	if meta.ResultsFilteredByACLs && len(entries) == 0 {
		// Instances exist but the token may read none of them: that is
		// not an empty service.
		return nil, nil, fmt.Errorf("consul: health query for %s: %w", service, ErrFilteredByACLs)
	}
	return entries, meta, nil
}

// ErrFilteredByACLs is returned when Consul says it filtered out every
// instance of a service because the ACL token may not read them (it needs
// service:read on the service and node:read on their nodes). It wraps
// registry.ErrPermission. A list of which the ACLs hid only a part is
// delivered, with a warning.
var ErrFilteredByACLs = fmt.Errorf("consul: the ACL token may read none of the instances: %w", registry.ErrPermission)

// mayRead asks the agent whether the token may read service, before an
// empty list is delivered: Consul hides what a token may not read instead of
// refusing it, so an empty answer alone does not tell an empty service from
// a refusal. The agent's local health endpoint for a service name checks
// service:read and refuses with 403; it answers 404 (no instance on this
// agent), 429 or 503 (instances warning or critical) otherwise.
func (b *backend) mayRead(ctx, stop context.Context, service string) error {
	qctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	if stop != nil {
		defer context.AfterFunc(stop, cancel)()
	}
	var out []api.AgentServiceChecksInfo
	_, err := b.c.Raw().Query("/v1/agent/health/service/name/"+b.name(service), &out, (&api.QueryOptions{}).WithContext(qctx))
	switch {
	case err == nil, isStatus(err, http.StatusNotFound), isStatus(err, http.StatusTooManyRequests), isStatus(err, http.StatusServiceUnavailable):
		return nil
	case stop != nil && stop.Err() != nil && ctx.Err() == nil:
		return errStreamClosed
	}
	return b.wrap(ctx, "checking read access to "+service, err)
}

// convert returns the instances of entries, skipping entries with no
// service, ordered by ID and address: near=_agent orders the answers by
// round-trip time, which changes without the list changing.
func (b *backend) convert(entries []*api.ServiceEntry) []driver.Instance {
	out := make([]driver.Instance, 0, len(entries))
	for _, e := range entries {
		if in, ok := b.fromEntry(e); ok {
			out = append(out, in)
		}
	}
	slices.SortStableFunc(out, func(x, y driver.Instance) int {
		return cmp.Or(strings.Compare(x.ID, y.ID), strings.Compare(x.Addr, y.Addr))
	})
	return out
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	if b.isClosed() {
		return nil, errClosed
	}
	entries, _, err := b.health(ctx, nil, service, 0)
	if err != nil {
		return nil, err
	}
	list := b.convert(entries)
	if len(list) == 0 {
		if err := b.mayRead(ctx, nil, service); err != nil {
			return nil, err
		}
	}
	return list, nil
}

// Watch returns a stream of service. It makes no request: ctx, which bounds
// opening only, is not used; the stream lives until its Close or the
// backend's.
func (b *backend) Watch(_ context.Context, service string) (driver.Stream, error) {
	if b.isClosed() {
		return nil, errClosed
	}
	sctx, cancel := context.WithCancel(b.ctx)
	return &stream{b: b, service: service, ctx: sctx, cancel: cancel}, nil
}

// Ping asks the agent for the cluster leader: it fails when the agent does
// not answer or its cluster has no leader. It then checks that the agent
// knows the ACL token (an unknown or expired token wraps
// registry.ErrPermission); what a known token may do is checked by each call.
func (b *backend) Ping(ctx context.Context) error {
	if b.isClosed() {
		return errClosed
	}
	qctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	leader, err := b.c.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(qctx))
	if err != nil {
		return b.wrap(ctx, "ping", err)
	}
	if leader == "" {
		return fmt.Errorf("consul: ping: the cluster has no leader: %w", registry.ErrUnavailable)
	}
	// The status endpoints ignore tokens; the agent's health endpoint
	// resolves the token first (403 "ACL not found" for an unknown one),
	// then checks service:read (403 "Permission denied", which proves the
	// token is known).
	var out []api.AgentServiceChecksInfo
	_, err = b.c.Raw().Query("/v1/agent/health/service/name/"+b.name(SessionService), &out, (&api.QueryOptions{}).WithContext(qctx))
	var se api.StatusError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se) && se.Code == http.StatusForbidden && !strings.Contains(se.Body, "ACL not found"):
		return nil
	case errors.As(err, &se) && (se.Code == http.StatusNotFound || se.Code == http.StatusTooManyRequests || se.Code == http.StatusServiceUnavailable):
		return nil
	}
	return b.wrap(ctx, "ping", err)
}

// Close stops the renewal loop and every watch, then removes the session's
// heartbeat from the agent. Package registry has withdrawn the publications
// before; if one of those withdrawals failed, the heartbeat is failed
// instead of removed: the agent does not re-evaluate an alias check when its
// service goes (it keeps its last status, or passes: "no checks found", for
// up to a minute), so an instance left behind would stay visible, while a
// failed heartbeat makes it critical at once (and Consul reaps both after
// deregister_after). Requests the agent did not answer in time may still
// reach it later: a late renewal then only delays that by one TTL.
func (b *backend) Close() error {
	b.sessMu.Lock() // no session being registered
	b.mu.Lock()
	b.closed = true
	ss := b.sess
	b.sess = nil
	leftover := len(b.pubs) > 0
	b.mu.Unlock()
	b.sessMu.Unlock()
	live := ss != nil && !ss.IsLost()
	if live {
		ss.Lose(errClosed)
	}
	b.cancel() // the renewal loop stops renewing
	b.wg.Wait()
	b.mu.Lock()
	leftover = leftover || b.abandoned > 0 // registrations of failed Publishes not removed
	b.mu.Unlock()
	var err error
	if live {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		if leftover {
			err = b.failSession(ctx, ss)
		} else {
			err = b.deregisterSession(ctx, ss)
		}
		cancel()
	}
	if b.ownTransport != nil {
		b.ownTransport.CloseIdleConnections()
	}
	return err
}
