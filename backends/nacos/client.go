package nacos

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/common/constant"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"
)

// DefaultTimeout is the SDK request timeout NewClient uses when none is given.
const DefaultTimeout = 5 * time.Second

// ClientOptions configure NewClient.
type ClientOptions struct {
	// Servers are the Nacos servers' HTTP addresses, "host:port"; the SDK
	// uses gRPC on port+1000.
	Servers []string
	// Namespace is the Nacos namespace id; "public" when empty.
	Namespace string
	// Username and Password log in to a server with authentication enabled.
	Username, Password string
	// Timeout bounds each SDK request; DefaultTimeout when zero.
	Timeout time.Duration
	// CacheDir is where the SDK writes its service cache and would write its
	// log files; os.UserCacheDir()/rollcall/nacos when empty (a temporary
	// directory if there is no user cache directory), never the working
	// directory.
	CacheDir string
	// Logger receives the SDK's log lines (the SDK logger is process-wide:
	// the last NewClient or New with a Logger wins); slog.Default() at the
	// time of each line when nil.
	Logger *slog.Logger
	// KeepSDKLogger leaves the SDK's process-wide logger as it is: for an
	// application that configures nacos-sdk-go's logger itself (its config
	// client, say). Without it, the first NewClient (or New with a Logger)
	// of the process installs SDKLogger over whatever was set. With it, the
	// SDK logs where it was told to, or, if nothing was set, to files in
	// CacheDir's log directory, and passwords are not scrubbed from them.
	KeepSDKLogger bool
}

// Client is an SDK naming client made by NewClient. It is safe for concurrent
// use. Its CloseClient also stops the UDP push receiver that the SDK starts
// for every client and never stops otherwise (see udpleak_linux.go).
type Client struct {
	naming_client.INamingClient
	cfg       constant.ClientConfig
	udpPorts  []int
	closeOnce sync.Once
}

// sdkMu serialises the creation and shutdown of SDK clients: the SDK keeps
// them in a global map that Shutdown deletes from without its lock.
var sdkMu sync.Mutex

// NewClient creates an SDK naming client with the settings this package relies
// on: ephemeral-instance friendly timeouts, NotLoadCacheAtStart,
// UpdateCacheWhenEmpty, cache and log directories under the user cache
// directory, and the SDK's logs routed to slog (unless KeepSDKLogger). Like
// the SDK, it connects before it returns (it tries each server for a few seconds, then keeps
// reconnecting in the background); it fails only on bad options.
func NewClient(opts ClientOptions) (*Client, error) {
	if len(opts.Servers) == 0 {
		return nil, errors.New("nacos: NewClient with no server")
	}
	var servers []constant.ServerConfig
	for _, s := range opts.Servers {
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			return nil, fmt.Errorf("nacos: server %q is not host:port", s)
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("nacos: server %q: bad port", s)
		}
		servers = append(servers, constant.ServerConfig{IpAddr: host, Port: p})
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	dir := opts.CacheDir
	if dir == "" {
		dir = defaultCacheDir()
	}
	ns := opts.Namespace
	if ns == "" {
		ns = constant.DEFAULT_NAMESPACE_ID
	}
	cc := constant.ClientConfig{
		TimeoutMs:            uint64(opts.Timeout / time.Millisecond),
		NamespaceId:          ns,
		Username:             opts.Username,
		Password:             opts.Password,
		NotLoadCacheAtStart:  true,
		UpdateCacheWhenEmpty: true,
		CacheDir:             filepath.Join(dir, "cache"),
		LogDir:               filepath.Join(dir, "log"),
		LogLevel:             "warn",
	}
	// The SDK creates the directory on its first write, racing with itself
	// when two of its goroutines write at once.
	_ = os.MkdirAll(filepath.Join(cc.CacheDir, "naming", ns), 0o755)
	if !opts.KeepSDKLogger {
		routeSDKLogs(opts.Logger)
	}
	addSecret(opts.Password)

	sdkMu.Lock()
	defer sdkMu.Unlock()
	before := udpReceivers()
	cli, err := clients.NewNamingClient(vo.NacosClientParam{ClientConfig: &cc, ServerConfigs: servers})
	if err != nil {
		removeSecret(opts.Password)
		return nil, fmt.Errorf("nacos: creating the SDK client: %w", scrubErr(err, opts.Password))
	}
	c := &Client{INamingClient: cli, cfg: cc}
	for port := range udpReceivers() {
		if !before[port] {
			c.udpPorts = append(c.udpPorts, port)
		}
	}
	awaitInitialEvent(cli, 2*time.Second)
	return c, nil
}

// CloseClient closes the SDK client and stops its UDP push receiver. It is
// idempotent. Closing a client that is reconnecting waits, up to a few
// seconds, for the SDK's attempt in flight, to close the connection it may
// still make (see reapLateConnection).
func (c *Client) CloseClient() {
	c.closeOnce.Do(func() {
		rc, hooked := rpcClient(c.INamingClient)
		reconnecting := hooked && !rc.IsRunning() // a connection attempt may be under way
		sdkMu.Lock()
		c.INamingClient.CloseClient()
		sdkMu.Unlock()
		if reconnecting {
			reapLateConnection(rc)
		}
		wakeUDPReceivers(c.udpPorts)
		removeSecret(c.cfg.Password)
	})
}

// defaultCacheDir is os.UserCacheDir()/rollcall/nacos, or a directory under
// the temporary directory when there is no user cache directory.
func defaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil && d != "" {
		return filepath.Join(d, "rollcall", "nacos")
	}
	return filepath.Join(os.TempDir(), "rollcall-nacos-"+strconv.Itoa(os.Getuid()))
}

// clientConfig returns the SDK configuration of cli when it can tell.
func clientConfig(cli naming_client.INamingClient) (constant.ClientConfig, bool) {
	for range 10 {
		switch c := cli.(type) {
		case *Client:
			return c.cfg, true
		case interface {
			GetClientConfig() (constant.ClientConfig, error)
		}:
			cc, err := c.GetClientConfig()
			return cc, err == nil
		case interface {
			Unwrap() naming_client.INamingClient
		}:
			cli = c.Unwrap()
		default:
			return constant.ClientConfig{}, false
		}
	}
	return constant.ClientConfig{}, false
}

// sdkClient returns the SDK's own client under cli, for the connection hook:
// the client of a *Client, or of a wrapper with an Unwrap method.
func sdkClient(cli naming_client.INamingClient) naming_client.INamingClient {
	for range 10 {
		switch c := cli.(type) {
		case *Client:
			cli = c.INamingClient
		case interface {
			Unwrap() naming_client.INamingClient
		}:
			cli = c.Unwrap()
		default:
			return cli
		}
	}
	return cli
}
