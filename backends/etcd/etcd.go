// Package etcd is rollcall's etcd backend, scheme etcd://, over
// go.etcd.io/etcd/client/v3.
//
// URL form:
//
//	etcd://[user:password@]host1:2379[,host2:2379...]/[prefix]?ttl=10s&tls=true&ca=ca.pem&cert=c.pem&key=k.pem&dial-timeout=3s&layout=rollcall
//
// Parameters: ttl (lease TTL, default 10s), tls (use TLS; implied by ca,
// cert or key), ca, cert, key (PEM file paths), dial-timeout (how long one
// connection attempt, its TCP, TLS and HTTP/2 handshakes, and logging in
// may take; default 3s), layout (rollcall, gozero or kratos: see Layouts;
// default rollcall), kratos-scheme (layout=kratos only: the endpoint
// scheme, default grpc). Unknown parameters are rejected. The password
// never appears in errors or logs. Open does not dial: use Ping.
//
// # Layouts
//
// The layout (Options.Layout, URL parameter layout) says where the keys of
// a service live and what their values hold, so that rollcall shares the
// registrations of go-zero and kratos services: it reads theirs, and they
// find rollcall's. Only the codec of keys and values differs; leases,
// ownership, guards and watches are the same in every layout.
//
//	layout    key                            value
//	rollcall  /rollcall/[prefix/]SERVICE/ID  {"Addr":"host:port","Metadata":{...}}
//	gozero    [prefix/]SERVICE/ID            host:port
//	kratos    /NAMESPACE/SERVICE/ID          {"id":ID,"name":SERVICE,"version":...,"metadata":{...},"endpoints":["grpc://host:port"]}
//
// gozero is the layout of go-zero's core/discov: zrpc's Etcd.Key is
// SERVICE, after the URL path (etcd://h:2379/team-a?layout=gozero reads and
// writes go-zero's key team-a/user.rpc; a key starting with '/' needs
// Options.Prefix, from code). discov's Publisher writes KEY/<lease ID in
// decimal> (KEY/<id> with WithId) holding the address alone, and its
// Subscriber takes the value of every key under KEY/ as an address. So the
// instance ID is the key's last segment (go-zero's lease ID), and a rollcall
// registration writes KEY/<its ID>. A go-zero value holds nothing but the
// address: registering, or updating to, an instance with metadata fails
// with an error wrapping registry.ErrInvalidInstance and writes nothing,
// and instances read have no metadata (no weight, zone or version, and no
// draining mark, registry.MetaServing). With no prefix the root is the
// whole key space: Services lists every SERVICE/ID key there.
//
// kratos is the layout of kratos' contrib/registry/etcd, whose Registry's
// default Namespace is /microservices; the URL path replaces it
// (etcd://h:2379/ns?layout=kratos is Namespace("/ns")). The value is the
// JSON of kratos' registry.ServiceInstance. Read: Addr is the host:port of
// the first endpoint whose scheme is kratos-scheme (grpc by default; an
// instance with none, an HTTP-only one, is skipped with a log line, as is a
// value of another service name, which kratos' readers skip too); Metadata
// is kratos' metadata plus its version field under registry.MetaVersion;
// the other endpoints, and an endpoint's query (isSecure), are not carried.
// Written: id and name are the instance's ID and service, version is
// Metadata[registry.MetaVersion] (left out of metadata), metadata the rest,
// endpoints the one URL kratos-scheme://Addr.
//
// Every layout keeps the backend's fence keys (one per lease, written with
// each withdrawal so that a late retried write cannot bring a withdrawn key
// back) in the directory .fence under its root, which no service name can
// be.
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
// naming/endpoints.Endpoint, so etcd's gRPC resolver
// (go.etcd.io/etcd/client/v3/naming/resolver) reads the same keys: its
// target is etcd:/// followed by the service directory without its
// trailing '/', etcd:////rollcall/user.rpc (four slashes: that resolver
// drops one leading '/' of the path) for service user.rpc of
// etcd://h:2379, and etcd:////rollcall/team-a/user.rpc with prefix team-a.
// (This is the default layout, rollcall's; see Layouts for go-zero's and
// kratos'.)
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
	// Layout is how instances are stored: LayoutRollcall when empty,
	// LayoutGoZero or LayoutKratos to share the keys of go-zero or kratos
	// services. It also sets the default Prefix: DefaultPrefix,
	// DefaultGoZeroPrefix (empty: go-zero keys have no root) or
	// DefaultKratosPrefix.
	Layout Layout
	// KratosScheme is the scheme of the kratos endpoint an instance's
	// address is read from and written as (LayoutKratos only);
	// DefaultKratosScheme ("grpc") when empty.
	KratosScheme string
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
	layout := p.String("layout", string(LayoutRollcall))
	opts.KratosScheme = p.String("kratos-scheme", "")
	useTLS := p.Bool("tls", false)
	ca, cert, key := p.String("ca", ""), p.String("cert", ""), p.String("key", "")
	cfg.DialTimeout = p.Duration("dial-timeout", DefaultDialTimeout)
	if err := p.Err(); err != nil {
		return cfg, nil, err
	}
	if u.Opaque != "" || u.Host == "" {
		return cfg, nil, badURL(u, "no host")
	}
	l, err := layoutOf(layout)
	if err != nil {
		return cfg, nil, badURL(u, "%v", err)
	}
	opts.Layout = l
	if opts.KratosScheme != "" && l != LayoutKratos {
		return cfg, nil, badURL(u, "kratos-scheme is for layout=kratos only")
	}
	if opts.KratosScheme != "" && !validScheme(opts.KratosScheme) {
		return cfg, nil, badURL(u, "kratos-scheme %q is not a URL scheme", opts.KratosScheme)
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
		opts.Prefix = l.urlPrefix(prefix)
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
	if opts != nil && opts.Layout != "" && !opts.Layout.valid() {
		return nil, fmt.Errorf("etcd: New: layout %q is not one of rollcall, gozero, kratos", opts.Layout)
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
	if o.Layout == "" {
		o.Layout = LayoutRollcall
	}
	if o.Layout == LayoutKratos && o.KratosScheme == "" {
		o.KratosScheme = DefaultKratosScheme
	}
	if o.Prefix == "" {
		o.Prefix = o.Layout.defaultPrefix()
	}
	if o.Prefix != "" && !strings.HasSuffix(o.Prefix, "/") {
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
	return &backend{cli: cli, dial: dial, opts: o, codec: newCodec(&o), log: o.Logger, ctx: ctx, cancel: cancel,
		pubs: map[string]*publication{}, leases: map[clientv3.LeaseID]bool{}, fences: map[clientv3.LeaseID]int64{}, takenBy: map[string]clientv3.LeaseID{}}
}

type backend struct {
	cliMu  sync.Mutex
	cli    *clientv3.Client // nil until connect when dial is set
	dial   func(context.Context) (*clientv3.Client, error)
	opts   Options
	codec  codec // the layout's
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

func (b *backend) dir(service string) string { return b.opts.Prefix + service + "/" }

func (b *backend) key(inst driver.Instance) string { return b.dir(inst.Service) + inst.ID }

func (b *backend) encode(inst driver.Instance) (string, error) { return b.codec.encode(inst) }

// CheckInstance refuses what the layout cannot store (driver.InstanceChecker).
func (b *backend) CheckInstance(inst driver.Instance) error {
	_, err := b.codec.encode(inst)
	return err
}

// decode turns a key-value under dir into an instance; ok is false for
// entries that are not ours to read (nested keys) or do not decode.
func (b *backend) decode(service, dir string, k, v []byte) (driver.Instance, bool) {
	id := strings.TrimPrefix(string(k), dir)
	if id == "" || strings.Contains(id, "/") {
		return driver.Instance{}, false
	}
	in, err := b.codec.decode(service, id, v)
	if err != nil {
		b.log.Warn("etcd: skipping undecodable value", "key", string(k), "layout", b.opts.Layout, "err", err)
		return driver.Instance{ID: id}, false
	}
	return in, true
}

// pingKey is the key Ping reads: the prefix, or for a layout whose root is
// the whole key space (go-zero's), the fence directory's key there.
func (b *backend) pingKey() string {
	if b.opts.Prefix == "" {
		return fenceDir
	}
	return b.opts.Prefix
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
	_, err := b.cli.Get(clientv3.WithRequireLeader(ctx), b.pingKey(), clientv3.WithCountOnly())
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
