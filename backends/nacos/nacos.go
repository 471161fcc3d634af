// Package nacos is rollcall's Nacos 2.x backend, scheme nacos://, over
// github.com/nacos-group/nacos-sdk-go/v2 (v2.3.5).
//
// # URL form
//
//	nacos://[user:password@]host1:8848[,host2:8848...]/?namespace=NS&group=G&cluster=C&ttl=10s&timeout=5s
//
// Hosts are the servers' HTTP addresses (port 8848 when left out; Go's URL
// parser wants a port on the last one of a list); the SDK talks gRPC to
// port+1000 of each. Parameters:
//
//   - namespace: the Nacos namespace id; "public" when empty.
//   - group: the Nacos group every service of this registry lives in;
//     DEFAULT_GROUP when empty.
//   - cluster: the Nacos cluster registered instances are put in (DEFAULT
//     when empty). When given, Lookup and Watch also see only the instances of
//     that cluster, as a Nacos subscription with clusters=C does; without it
//     they see every cluster.
//   - ttl: see Liveness below (default 10s).
//   - timeout: the SDK's per-request timeout (default 5s).
//
// Unknown parameters are rejected. The user name and password are given to
// the SDK, which logs in over HTTP; they never appear in errors or in log
// lines (the SDK's log lines are scrubbed of the password and access tokens
// before they reach slog). Open does not dial; the SDK client is created on
// first use. Ping sends a request.
//
// Users who already hold an SDK client use New, which takes any
// naming_client.INamingClient; the namespace is then the client's. NewClient
// builds an SDK client with the settings this package relies on, and is what
// Open uses.
//
// # Mapping
//
// A rollcall service S is the Nacos service S of the registry's group and
// namespace: groups and namespaces are properties of the Registry (URL
// parameters or Options), never part of service names, so "nacos://h/?group=G"
// registering "user.rpc" is the Nacos service "G@@user.rpc". An instance's
// address is its Nacos ip and port; its ID is kept in the Nacos metadata under
// MetaID (instances registered by other Nacos clients, which have none, get
// their address as ID); its other metadata is the Nacos metadata as is. Its
// weight (registry.MetaWeight) is also the Nacos weight (1 when absent); an
// instance of another client with no weight key gets its Nacos weight,
// rounded, as MetaWeight when it is not 1. Registered instances are
// ephemeral, enabled and healthy. Lookup and Watch skip instances that Nacos
// would not route to: disabled, unhealthy, or of weight 0 or less.
//
// Nacos identifies an instance by service, cluster, ip and port: two IDs with
// the same address in one service and cluster are one Nacos instance.
//
// Registry.Services lists the services of the namespace and group as the
// server's service list has them; the server keeps a service whose
// instances are gone until its empty service cleaner removes it, so such a
// service may be listed for a minute or more (Lookup finds no instance).
//
// # Liveness
//
// Nacos 2.x ephemeral instances belong to the gRPC connection of the client
// that registered them: the server drops them when that connection closes,
// and there is no TTL or heartbeat. The connection is the lease: one per
// Registry, shared by all its registrations. The SDK allows one publication per
// service per connection, so the instances a Registry registers in one service
// are sent together (a single register request for one instance, a batch
// register for several); concurrent registrations are merged into one
// request.
//
// The ttl parameter is how long the server may go without answering the
// backend's probe (a cheap ServiceList request every second) before the
// registrations are reported lost: their Registration status turns
// Retrying until the server answers again and the instance is seen
// registered. It does not change anything on the server.
//
// A registration is lost (driver.Publication.Lost) when:
//   - the SDK replaced its connection (the server restarted, dropped the
//     connection, or the client reconnected to another server): the instances
//     of the old connection are gone from the server;
//   - the instance disappeared from the server's pushed list of its service
//     while the registration held (removed behind the registrar's back);
//   - the server has not answered for ttl.
//
// Cooperation with the SDK's redo: on every new connection the SDK itself
// re-subscribes and re-sends each service's last registration (its "redo").
// The backend watches the SDK's connection events (through the SDK client's
// internals, see connhook.go; with a client of another type it relies on the
// pushed lists only) and reports its registrations lost only after the SDK's
// redo ran. A lost registration's instance stays in what the backend
// registers (the redo may well have restored it). The supervisor then
// publishes it again; a publication whose instance is exactly what this
// connection already sent first waits (up to 1.5 s) for the server to show
// it, and sends nothing if it does, so a reconnect costs no second
// registration. If the redo failed (the SDK only logs that) the instance does
// not show up and the backend sends it itself. Deregistering a lost
// registration withdraws what the redo may have put back. Every
// registration, update and withdrawal returns once the server's pushed list
// shows it; when that takes more than 1.5 s, the backend sends the service's
// instances once more, because a redo that read the SDK's cache just before
// a newer request can have undone it (NewClient also waits for the SDK to
// handle the connection event it queues while starting, whose redo is the
// usual culprit).
//
// # Discovery
//
// Lookup and Watch share one SDK subscription per service and Registry; the
// SDK's callback only copies the pushed list and wakes the watchers (it never
// blocks and never calls the SDK). The SDK clients made by NewClient set
// UpdateCacheWhenEmpty, so a push of an empty list (the service has no
// instances left) reaches the watchers; SDK errors never empty a list.
// Because the SDK hides its connection state, the backend probes the server
// every second; when the probe has had no answer for 3 s, every watch stream
// fails (the shared layer keeps the last list and marks it stale), Lookup
// fails, and once the server answers again the streams start over with a
// Reset holding the full list.
//
// # SDK settings
//
// NewClient (and so Open) sets NotLoadCacheAtStart and UpdateCacheWhenEmpty,
// and puts the SDK's cache and log directories under
// os.UserCacheDir()/rollcall/nacos (never the working directory).
//
// The SDK's logger is process-wide, and this package replaces it: the first
// NewClient of the process, or New with Options.Logger set, installs
// SDKLogger (SDK info and debug lines at slog Debug, warnings at Info,
// errors at Warn, passwords scrubbed), which writes to the Logger of the
// last such call. It is installed once: a logger the application sets after
// that stays. An application that configures nacos-sdk-go's logger itself
// sets KeepSDKLogger (ClientOptions and Options), and its logger is left
// alone.
package nacos

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "nacos"

// DefaultPort is the Nacos HTTP port used when a URL gives none.
const DefaultPort = 8848

// MetaID is the Nacos metadata key that holds a rollcall instance's ID.
const MetaID = "rollcall.id"

// Nacos defaults, as the SDK fills them in.
const (
	DefaultGroup   = "DEFAULT_GROUP"
	DefaultCluster = "DEFAULT"
)

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

// Options configure a nacos Registry.
type Options struct {
	// Group is the Nacos group of every service; DefaultGroup when empty.
	Group string
	// Cluster is the Nacos cluster of registered instances (DefaultCluster
	// when empty). When set, Lookup and Watch see only that cluster.
	Cluster string
	// TTL is how long the server may go unanswered before registrations are
	// reported lost (see the package doc); driver.DefaultTTL when zero.
	TTL time.Duration
	// Logger receives the backend's log lines; slog.Default() when nil. When
	// set, New also routes the SDK's (process-wide) logger to it, unless
	// KeepSDKLogger.
	Logger *slog.Logger
	// KeepSDKLogger leaves the SDK's process-wide logger as the
	// application set it (see ClientOptions.KeepSDKLogger).
	KeepSDKLogger bool
	// Registry configures the shared layer. Its Logger defaults to Logger.
	Registry registry.Options
}

const urlForm = "nacos://[user:password@]host:8848[,host:8848]/?namespace=&group=&cluster=&ttl=10s&timeout=5s"

func badURL(u *url.URL, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s (form: %s)", registry.ErrInvalidURL, registry.RedactURL(u), fmt.Sprintf(format, args...), urlForm)
}

// parseURL reads a nacos:// URL into client and registry options.
func parseURL(u *url.URL) (ClientOptions, Options, error) {
	var co ClientOptions
	var o Options
	p := registry.NewURLParams(u)
	o.TTL = p.Duration("ttl", driver.DefaultTTL)
	co.Timeout = p.Duration("timeout", DefaultTimeout)
	co.Namespace = p.String("namespace", "")
	o.Group = p.String("group", "")
	o.Cluster = p.String("cluster", "")
	if err := p.Err(); err != nil {
		return co, o, err
	}
	if u.Opaque != "" || u.Host == "" {
		return co, o, badURL(u, "no host")
	}
	if u.Path != "" && u.Path != "/" {
		return co, o, badURL(u, "unexpected path %q (the group is the group parameter)", u.Path)
	}
	if u.Fragment != "" {
		return co, o, badURL(u, "unexpected fragment")
	}
	for _, h := range strings.Split(u.Host, ",") {
		addr, err := serverAddr(h)
		if err != nil {
			return co, o, badURL(u, "%v", err)
		}
		co.Servers = append(co.Servers, addr)
	}
	if u.User != nil {
		co.Username = u.User.Username()
		co.Password, _ = u.User.Password()
		if co.Username == "" {
			return co, o, badURL(u, "empty user name")
		}
	}
	if err := checkName("group", o.Group); err != nil {
		return co, o, badURL(u, "%v", err)
	}
	if err := checkName("namespace", co.Namespace); err != nil {
		return co, o, badURL(u, "%v", err)
	}
	if err := checkCluster(o.Cluster); err != nil {
		return co, o, badURL(u, "%v", err)
	}
	return co, o, nil
}

// serverAddr checks one "host[:port]" of a URL and returns "host:port".
func serverAddr(h string) (string, error) {
	if h == "" {
		return "", errors.New("empty server address")
	}
	host, port, err := net.SplitHostPort(h)
	if err != nil {
		// No port: the whole thing is the host (a bracketed IPv6 literal
		// keeps its brackets in h).
		host, port = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]"), strconv.Itoa(DefaultPort)
		if strings.ContainsAny(host, "[]") || strings.Count(host, ":") == 1 {
			return "", fmt.Errorf("server address %q is not host[:port]", h)
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535-1000 {
		return "", fmt.Errorf("server address %q: port must be 1-64535 (gRPC is port+1000)", h)
	}
	if host == "" {
		return "", fmt.Errorf("server address %q has no host", h)
	}
	return net.JoinHostPort(host, port), nil
}

// checkName validates a group or namespace as the Nacos server would.
func checkName(what, s string) error {
	if strings.Contains(s, "@@") {
		return fmt.Errorf("%s %q must not contain \"@@\"", what, s)
	}
	for _, r := range s {
		if r < 0x21 || r == 0x7f || r == '/' {
			return fmt.Errorf("%s %q contains %q", what, s, r)
		}
	}
	return nil
}

// checkCluster validates a cluster name as the Nacos server does
// (^[0-9a-zA-Z-]+$).
func checkCluster(s string) error {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
			return fmt.Errorf("cluster %q: only letters, digits and '-' are allowed", s)
		}
	}
	return nil
}

func openURL(ctx context.Context, u *url.URL) (registry.Registry, error) {
	co, o, err := parseURL(u)
	if err != nil {
		return nil, err
	}
	o.Logger = o.Registry.Logger
	co.Logger = o.Logger
	return newRegistry(nil, func() (naming_client.INamingClient, error) {
		cli, err := NewClient(co)
		if err != nil {
			return nil, err
		}
		return cli, nil
	}, co.Namespace, &o), nil
}

// New returns a Registry over an SDK client the caller holds. Close does not
// close cli, but withdraws what the Registry registered and drops its
// subscriptions. A wrapper of an SDK client may expose it with a method
// Unwrap() naming_client.INamingClient, so that the backend sees the SDK's
// connection events through it (see the package doc). cli should have UpdateCacheWhenEmpty set (NewClient does):
// without it the SDK drops pushes of empty lists and a watcher never sees a
// service's last instance go; New logs a warning when it can tell.
func New(cli naming_client.INamingClient, opts *Options) (registry.Registry, error) {
	if cli == nil {
		return nil, errors.New("nacos: New with nil client")
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	if err := checkName("group", o.Group); err != nil {
		return nil, fmt.Errorf("nacos: %w", err)
	}
	if err := checkCluster(o.Cluster); err != nil {
		return nil, fmt.Errorf("nacos: %w", err)
	}
	if o.Logger != nil && !o.KeepSDKLogger {
		routeSDKLogs(o.Logger)
	}
	ns := ""
	if cc, ok := clientConfig(cli); ok {
		ns = cc.NamespaceId
		if !cc.UpdateCacheWhenEmpty {
			logger(o.Logger, o.Registry.Logger).Warn("nacos: the SDK client does not have UpdateCacheWhenEmpty set; watchers will not see a service become empty")
		}
	}
	return newRegistry(cli, nil, ns, &o), nil
}

func logger(ls ...*slog.Logger) *slog.Logger {
	for _, l := range ls {
		if l != nil {
			return l
		}
	}
	return slog.Default()
}

func newRegistry(cli naming_client.INamingClient, mk func() (naming_client.INamingClient, error), namespace string, opts *Options) registry.Registry {
	o := *opts
	if o.Group == "" {
		o.Group = DefaultGroup
	}
	if o.TTL <= 0 {
		o.TTL = driver.DefaultTTL
	}
	o.Logger = logger(o.Logger, o.Registry.Logger)
	if o.Registry.Logger == nil {
		o.Registry.Logger = o.Logger
	}
	b := newBackend(cli, mk, namespace, &o)
	return registry.New(b, &o.Registry)
}
