// Package etcd is rollcall's etcd backend, scheme etcd://, over
// go.etcd.io/etcd/client/v3.
//
// URL form:
//
//	etcd://[user:password@]host1:2379[,host2:2379...]/[prefix]?ttl=10s&tls=true&ca=ca.pem&cert=c.pem&key=k.pem&dial-timeout=3s
//
// Parameters: ttl (lease TTL, default 10s), tls (use TLS; implied by ca,
// cert or key), ca, cert, key (PEM file paths), dial-timeout (how long one
// connection attempt, its TCP, TLS and HTTP/2 handshakes, and logging in
// may take; default 3s). Unknown parameters are rejected. The password
// never appears in errors or logs. Open does not dial: use Ping.
//
// Connections: a client opened from a URL is set up by Configure. Its unary
// calls fail at once with the connection's error ("connect: connection
// refused", a handshake that did not complete within dial-timeout) while no
// endpoint can be reached, instead of waiting for a connection until their
// context ends; a call to a server that accepted it and then froze ends
// with its context (the shared layer bounds every call), or once keepalive
// pings, sent every 5s and given 3s, close the dead connection. A client
// given to New behaves as it was configured; call Configure on its
// clientv3.Config to get the same. Authentication and authorization
// failures (a wrong password, a user without a role on the prefix) wrap
// registry.ErrPermission, never registry.ErrUnavailable. Ping reads the
// prefix key itself, so it needs read permission on it.
//
// Key layout: an instance of service S with ID I lives at
// ROOT S/I, where ROOT is Options.Prefix ("/rollcall/" by default) followed
// by the URL path and a '/' ("/rollcall/team-a/" for etcd://h:2379/team-a).
// Because every service directory ends with '/', a watch of "user" never sees
// "user2", and the prefix team-a never sees team-ab. The value is JSON,
// {"Addr":"10.0.0.7:8080","Metadata":{...}}, the shape of etcd's own
// naming/endpoints.Endpoint, so etcd's gRPC resolver reads the same keys.
// Values that do not decode, or decode to an invalid instance, are skipped
// with a log line. Registry.Services reads the keys (not the values) under
// ROOT and lists the SERVICE of every ROOT SERVICE/ID key; the keys of a
// deeper prefix (ROOT team-a/SERVICE/ID) are not listed.
//
// Liveness: one lease per Registry, shared by all its registrations and
// renewed by clientv3's keepalive (about one keepalive per TTL/3 whatever the
// number of instances). etcd grants whole seconds and at least its minimum
// TTL (1.5 election timeouts, rounded up: 2s with etcd's defaults), so
// ttl=500ms becomes 2s there; the granted TTL is logged once, at INFO, when
// it differs from the one asked for. When the last registration is
// withdrawn the lease is revoked. A lease clientv3 could not renew within
// its TTL (the server was unreachable) makes its registrations lost, so
// their Status says so; the backend keeps renewing it, and the
// registrations publish again under it if it is still alive (a restarted
// etcd extends every lease by about its TTL; the instances then never
// disappear), or under a new lease if the server says it is gone. etcd
// renews leases on its leader only, so a leader frozen (or stuck on its
// disk) for most of the TTL finds the lease expired when it resumes, and
// can revoke it through the new leader before it learns it lost the lead
// (etcd-io/etcd#15247; 3.6's leadership check passes once the resumed
// process ticks). So when a response carries a raft term later than the
// one the lease was granted in, the backend grants a lease in the new
// term, rewrites each of its keys under it (same value, in a transaction
// that compares the key's lease and revision) and revokes the old lease:
// one write per instance per leader election, and no instance ever
// disappears. A key that changed meanwhile is registered again.
//
// Ownership: a key is written in a transaction that puts it only if it is
// absent, carries a lease of this Registry, has no lease, or holds the same
// address (a restarted process taking over its own endpoint). A key another
// live lease holds at another address is not overwritten: Register fails
// with an error wrapping registry.ErrConflict that names the holder's
// lease. The registrar watches the service directories it has published
// in; an instance deleted there is registered again, one overwritten by
// another lease is lost with ErrConflict and is not taken back from that
// lease (two registrars of one endpoint do not fight over it).
//
// Discovery lists the service directory, then watches it from the listed
// revision with WithRequireLeader (events of that revision, already in the
// list, are skipped), so no event is missed between the two. Each watch
// has a gRPC stream of its own. An idle watch asks the server for a
// progress notification every ProgressInterval; if none comes within
// ProgressTimeout it lists the service again: if that fails too (a frozen
// or unreachable server), or the server's revision went backwards (data
// wiped), the watch ends, and the shared layer keeps the last list, marks
// it stale, and relists; if it succeeds, the watch delivers the list and
// goes on from its revision. (etcd answers progress requests only for
// watches that are in sync and start at or before its current revision;
// a watch clientv3 resumed after a reconnection starts after it.)
package etcd

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "etcd"

// DefaultPrefix is the key prefix under which services live.
const DefaultPrefix = "/rollcall/"

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

// Options configure an etcd Registry.
type Options struct {
	// Prefix is the key prefix of every service directory; DefaultPrefix
	// when empty. A '/' is appended if missing.
	Prefix string
	// TTL of the registration lease; driver.DefaultTTL when zero. etcd
	// rounds it up to whole seconds and to its minimum TTL.
	TTL time.Duration
	// ProgressInterval is how long a watch may be idle before it asks the
	// server for a progress notification, to notice a frozen server or lost
	// data; 2s when zero. A request unanswered for ProgressTimeout (3s when
	// zero) makes the watch list its service again, with the same bound; a
	// list that fails ends the watch, and its watcher turns stale.
	ProgressInterval, ProgressTimeout time.Duration
	// Logger receives the backend's log lines; slog.Default() when nil.
	Logger *slog.Logger
	// Registry configures the shared layer. Its Logger defaults to Logger.
	Registry registry.Options
}

func openURL(ctx context.Context, u *url.URL) (registry.Registry, error) {
	cfg, opts, err := parseURL(u)
	if err != nil {
		return nil, err
	}
	cfg.Logger = zapLogger(opts.Logger)
	Configure(&cfg)
	// clientv3.New authenticates at once when given a user and password, so
	// the client is made at first use: Open never dials.
	where := registry.RedactURL(u)
	dial := func(ctx context.Context) (*clientv3.Client, error) {
		c := cfg
		if dl, ok := ctx.Deadline(); ok && (c.DialTimeout <= 0 || time.Until(dl) < c.DialTimeout) {
			c.DialTimeout = max(time.Until(dl), time.Millisecond)
		}
		cli, err := clientv3.New(c)
		if err != nil {
			return nil, fmt.Errorf("etcd: connecting to %s: %w", where, err)
		}
		return cli, nil
	}
	return newRegistry(nil, dial, opts)
}

func badURL(u *url.URL, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s (form: etcd://host:2379[,host:2379]/[prefix]?ttl=10s)", registry.ErrInvalidURL, registry.RedactURL(u), fmt.Sprintf(format, args...))
}

func parseURL(u *url.URL) (clientv3.Config, *Options, error) {
	var cfg clientv3.Config
	p := registry.NewURLParams(u)
	opts := &Options{TTL: p.Duration("ttl", driver.DefaultTTL), Logger: slog.Default()}
	useTLS := p.Bool("tls", false)
	ca, cert, key := p.String("ca", ""), p.String("cert", ""), p.String("key", "")
	cfg.DialTimeout = p.Duration("dial-timeout", DefaultDialTimeout)
	if err := p.Err(); err != nil {
		return cfg, nil, err
	}
	if u.Opaque != "" || u.Host == "" {
		return cfg, nil, badURL(u, "no host")
	}
	for _, h := range strings.Split(u.Host, ",") {
		host, port, err := net.SplitHostPort(h)
		if err != nil || host == "" || port == "" {
			return cfg, nil, badURL(u, "endpoint %q is not host:port", h)
		}
		cfg.Endpoints = append(cfg.Endpoints, h)
	}
	prefix := strings.Trim(u.Path, "/")
	if prefix != "" {
		for _, seg := range strings.Split(prefix, "/") {
			if seg == "" || seg == "." || seg == ".." {
				return cfg, nil, badURL(u, "prefix %q has an empty or dot segment", prefix)
			}
		}
		opts.Prefix = DefaultPrefix + prefix + "/"
	}
	if u.User != nil {
		cfg.Username = u.User.Username()
		cfg.Password, _ = u.User.Password()
	}
	if useTLS || ca != "" || cert != "" || key != "" {
		tc, err := tlsConfig(ca, cert, key)
		if err != nil {
			return cfg, nil, badURL(u, "%v", err)
		}
		cfg.TLS = tc
	}
	return cfg, opts, nil
}

func tlsConfig(ca, cert, key string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if (cert == "") != (key == "") {
		return nil, errors.New("cert and key go together")
	}
	if cert != "" {
		c, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("loading client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	if ca != "" {
		pool, err := loadCA(ca)
		if err != nil {
			return nil, err
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

// New returns a Registry over a client the caller holds. Close does not
// close cli.
func New(cli *clientv3.Client, opts *Options) (registry.Registry, error) {
	if cli == nil {
		return nil, errors.New("etcd: New with nil client")
	}
	return newRegistry(cli, nil, opts)
}

// newRegistry takes a client, or a dial function that makes one at first
// use (and the registry then owns and closes it).
func newRegistry(cli *clientv3.Client, dial func(context.Context) (*clientv3.Client, error), opts *Options) (registry.Registry, error) {
	b := newBackend(cli, dial, opts)
	return registry.New(b, &b.opts.Registry), nil
}

func newBackend(cli *clientv3.Client, dial func(context.Context) (*clientv3.Client, error), opts *Options) *backend {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.TTL <= 0 {
		o.TTL = driver.DefaultTTL
	}
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = 2 * time.Second
	}
	if o.ProgressTimeout <= 0 {
		o.ProgressTimeout = 3 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry.Logger == nil {
		o.Registry.Logger = o.Logger
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &backend{cli: cli, dial: dial, opts: o, log: o.Logger, ctx: ctx, cancel: cancel,
		pubs: map[string]*publication{}, leases: map[clientv3.LeaseID]bool{}, fences: map[clientv3.LeaseID]int64{}, takenBy: map[string]clientv3.LeaseID{}}
}

type backend struct {
	cliMu  sync.Mutex
	cli    *clientv3.Client // nil until connect when dial is set
	dial   func(context.Context) (*clientv3.Client, error)
	opts   Options
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	ttlLogged  atomic.Bool  // the granted TTL was logged
	progressed atomic.Int64 // progress notifications received, for tests

	streamsMu   sync.Mutex
	freeStreams []string // watch stream names no watch uses now
	nStreams    int      // watch stream names made

	sessMu  sync.Mutex // held while granting; never under mu
	mu      sync.Mutex
	sess    *session
	pubs    map[string]*publication     // by key
	leases  map[clientv3.LeaseID]bool   // every lease this backend was granted
	fences  map[clientv3.LeaseID]int64  // the mod revision of each lease's fence key, once written (see put)
	takenBy map[string]clientv3.LeaseID // key -> the other lease that overwrote this backend's publication of it

	moveHook func(key string) // tests: called before a key is moved to a new lease
}

var (
	_ driver.Backend       = (*backend)(nil)
	_ driver.Pinger        = (*backend)(nil)
	_ driver.ServiceLister = (*backend)(nil)
	_ driver.Publication   = (*publication)(nil)
	_ driver.Stream        = (*stream)(nil)
)

// value is the stored JSON, etcd naming/endpoints.Endpoint's shape.
type value struct {
	Addr     string            `json:"Addr"`
	Metadata map[string]string `json:"Metadata,omitempty"`
}

func (b *backend) dir(service string) string { return b.opts.Prefix + service + "/" }

func (b *backend) key(inst driver.Instance) string { return b.dir(inst.Service) + inst.ID }

func encode(inst driver.Instance) (string, error) {
	v, err := json.Marshal(value{Addr: inst.Addr, Metadata: inst.Metadata})
	return string(v), err
}

// decode turns a key-value under dir into an instance; ok is false for
// entries that are not ours to read (nested keys) or do not decode.
func (b *backend) decode(service, dir string, k, v []byte) (driver.Instance, bool) {
	id := strings.TrimPrefix(string(k), dir)
	if id == "" || strings.Contains(id, "/") {
		return driver.Instance{}, false
	}
	var val value
	if err := json.Unmarshal(v, &val); err != nil {
		b.log.Warn("etcd: skipping undecodable value", "key", string(k), "err", err)
		return driver.Instance{ID: id}, false
	}
	return driver.Instance{Service: service, ID: id, Addr: val.Addr, Metadata: val.Metadata}, true
}

// connect makes the client if the registry was opened from a URL and has
// not made it yet. Every entry point that talks to etcd calls it first; the
// goroutines started later read b.cli after it.
func (b *backend) connect(ctx context.Context) error {
	b.cliMu.Lock()
	defer b.cliMu.Unlock()
	if b.cli != nil {
		return nil
	}
	if b.ctx.Err() != nil {
		return errors.New("etcd: backend closed")
	}
	cli, err := b.dial(ctx)
	if err != nil {
		return classify(err)
	}
	b.cli = cli
	return nil
}

// Ping reads the prefix key (count only) with a linearizable read: the
// server answers, has a leader, and lets this client read the prefix.
func (b *backend) Ping(ctx context.Context) error {
	if err := b.connect(ctx); err != nil {
		return err
	}
	_, err := b.cli.Get(clientv3.WithRequireLeader(ctx), b.opts.Prefix, clientv3.WithCountOnly())
	return classify(err)
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	list, _, err := b.list(ctx, service)
	return list, err
}

// list returns the instances of service and the revision they were read at.
func (b *backend) list(ctx context.Context, service string) ([]driver.Instance, int64, error) {
	if err := b.connect(ctx); err != nil {
		return nil, 0, err
	}
	dir := b.dir(service)
	resp, err := b.cli.Get(clientv3.WithRequireLeader(ctx), dir, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, classify(err)
	}
	out := make([]driver.Instance, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if in, ok := b.decode(service, dir, kv.Key, kv.Value); ok {
			out = append(out, in)
		}
	}
	return out, resp.Header.Revision, nil
}

// Services reads the keys (not the values) under the prefix and returns
// the services that have an instance key, ROOT SERVICE/ID. Deeper keys
// belong to other prefixes (ROOT team-a/SERVICE/ID) and are not listed.
func (b *backend) Services(ctx context.Context) ([]string, error) {
	if err := b.connect(ctx); err != nil {
		return nil, err
	}
	resp, err := b.cli.Get(clientv3.WithRequireLeader(ctx), b.opts.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, classify(err)
	}
	var out []string
	for _, kv := range resp.Kvs {
		svc, id, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), b.opts.Prefix), "/")
		if ok && svc != "" && svc != fenceDir && id != "" && !strings.Contains(id, "/") && (len(out) == 0 || out[len(out)-1] != svc) {
			out = append(out, svc)
		}
	}
	return out, nil
}

func (b *backend) Close() error {
	// The live session, and one whose publications were being moved to it
	// (rotate) with some left.
	b.mu.Lock()
	var live []clientv3.LeaseID
	if b.sess != nil {
		live = append(live, b.sess.id)
	}
	for _, p := range b.pubs {
		if !slices.Contains(live, p.sess.id) {
			live = append(live, p.sess.id)
		}
	}
	b.sess = nil
	b.mu.Unlock()
	b.cliMu.Lock()
	cli := b.cli
	b.mu.Lock() // sawTerm starts a goroutine only before this
	b.cancel()  // no connect after this
	b.mu.Unlock()
	b.cliMu.Unlock()
	var err error
	if len(live) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		for _, id := range live {
			if _, rerr := cli.Revoke(ctx, id); rerr != nil && !isLeaseNotFound(rerr) {
				err = errors.Join(err, classify(rerr))
			}
		}
		cancel()
	}
	b.wg.Wait()
	if b.dial != nil && cli != nil {
		err = errors.Join(err, cli.Close())
	}
	return err
}
