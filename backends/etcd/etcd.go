// Package etcd is rollcall's etcd backend, scheme etcd://, over
// go.etcd.io/etcd/client/v3.
//
// URL form:
//
//	etcd://[user:password@]host1:2379[,host2:2379...]/[prefix]?ttl=10s&tls=true&ca=ca.pem&cert=c.pem&key=k.pem&dial-timeout=5s
//
// Parameters: ttl (lease TTL, default 10s), tls (use TLS; implied by ca,
// cert or key), ca, cert, key (PEM file paths), dial-timeout (default 5s).
// Unknown parameters are rejected. The password never appears in errors or
// logs. Open does not dial: use Ping.
//
// Key layout: an instance of service S with ID I lives at
// ROOT S/I, where ROOT is Options.Prefix ("/rollcall/" by default) followed
// by the URL path and a '/' ("/rollcall/team-a/" for etcd://h:2379/team-a).
// Because every service directory ends with '/', a watch of "user" never sees
// "user2". The value is JSON, {"Addr":"10.0.0.7:8080","Metadata":{...}}, the
// shape of etcd's own naming/endpoints.Endpoint, so etcd's gRPC resolver
// reads the same keys. Values that do not decode, or decode to an invalid
// instance, are skipped with a log line.
//
// Liveness: one lease per Registry, shared by all its registrations and
// renewed by clientv3's keepalive (about one keepalive per TTL/3 whatever the
// number of instances). When the last registration is withdrawn the lease is
// revoked. The registrar also watches its own keys, so an instance deleted or
// overwritten by someone else is registered again.
//
// Discovery lists the service directory, then watches it from the listed
// revision + 1 with WithRequireLeader, so no event is missed between the
// two. A compacted revision, a server whose revision went backwards (data
// wiped) or a watch that stops answering progress requests ends the watch;
// the shared layer then keeps the last list, marks it stale, and relists.
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
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

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
	// ProgressInterval is how often an idle watch asks the server for a
	// progress notification, to notice a frozen server or lost data; 2s
	// when zero. A watch whose request goes unanswered for ProgressTimeout
	// (3s when zero) fails, and its watcher turns stale.
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
	// Notice a dead connection within seconds, and reconnect within about
	// two seconds of the server coming back (gRPC's default backoff grows
	// to two minutes).
	cfg.DialKeepAliveTime, cfg.DialKeepAliveTimeout = 5*time.Second, 3*time.Second
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
		MinConnectTimeout: 3 * time.Second,
	}))
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
	cfg.DialTimeout = p.Duration("dial-timeout", 5*time.Second)
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
	b := &backend{cli: cli, dial: dial, opts: o, log: o.Logger, ctx: ctx, cancel: cancel, pubs: map[string]*publication{}}
	return registry.New(b, &o.Registry), nil
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

	sessMu sync.Mutex // held while granting; never under mu
	mu     sync.Mutex
	sess   *session
	pubs   map[string]*publication // by key
}

var (
	_ driver.Backend     = (*backend)(nil)
	_ driver.Pinger      = (*backend)(nil)
	_ driver.Publication = (*publication)(nil)
	_ driver.Stream      = (*stream)(nil)
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
		return unavailable(err)
	}
	b.cli = cli
	return nil
}

// Ping asks the endpoints for their status until one answers.
func (b *backend) Ping(ctx context.Context) error {
	if err := b.connect(ctx); err != nil {
		return err
	}
	eps := b.cli.Endpoints()
	if len(eps) == 0 {
		return errors.New("etcd: no endpoints")
	}
	var errs []error
	for _, ep := range eps {
		if _, err := b.cli.Status(ctx, ep); err == nil {
			return nil
		} else {
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return unavailable(errors.Join(errs...))
}

func unavailable(err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: etcd: %w", registry.ErrUnavailable, err)
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	list, _, err := b.list(ctx, service)
	return list, err
}

func (b *backend) list(ctx context.Context, service string) ([]driver.Instance, int64, error) {
	if err := b.connect(ctx); err != nil {
		return nil, 0, err
	}
	dir := b.dir(service)
	resp, err := b.cli.Get(clientv3.WithRequireLeader(ctx), dir, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, unavailable(err)
	}
	out := make([]driver.Instance, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if in, ok := b.decode(service, dir, kv.Key, kv.Value); ok {
			out = append(out, in)
		}
	}
	return out, resp.Header.Revision, nil
}

func (b *backend) Close() error {
	b.mu.Lock()
	ss := b.sess
	b.sess = nil
	b.mu.Unlock()
	b.cliMu.Lock()
	cli := b.cli
	b.cancel() // no connect after this
	b.cliMu.Unlock()
	var err error
	if ss != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = cli.Revoke(ctx, ss.id)
		cancel()
		err = unavailable(err)
	}
	b.wg.Wait()
	if b.dial != nil && cli != nil {
		err = errors.Join(err, cli.Close())
	}
	return err
}
