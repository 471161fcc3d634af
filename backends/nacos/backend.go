package nacos

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client/naming_cache"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Timings of the health probe and of the background work.
var (
	// probeInterval is how often the server is probed.
	probeInterval = time.Second
	// unreachableAfter is how long the probe may go unanswered before
	// watches fail and Lookup refuses.
	unreachableAfter = 3 * time.Second
	// redoGrace is how long a publication of an instance that this
	// connection already sent waits for the server to show it before
	// sending it again.
	redoGrace = 1500 * time.Millisecond
	// pushWindow is how long a holder of an ID seen in a service's list
	// must stay there to be taken as one (Nacos pushes a change after its
	// merge window, nacos.naming.push.pushTaskDelay, 500 ms by default).
	pushWindow = 2 * time.Second
	// subLinger keeps an unused SDK subscription open a little, so that
	// repeated Lookups and watch restarts do not subscribe again each time.
	subLinger = 5 * time.Second
	// tick is the period of the maintenance loop.
	tick = 250 * time.Millisecond
)

var (
	errClosed      = errors.New("nacos: registry closed")
	errReconnected = errors.New("nacos: the SDK's connection to the server was replaced; the server dropped the instances of the old one")
	errGone        = errors.New("nacos: the instance is no longer in the server's list of its service")
	errReplaced    = errors.New("nacos: replaced by a newer registration of the same ID")
	errWithdrawn   = errors.New("nacos: withdrawn")
)

type backend struct {
	log     *slog.Logger
	group   string
	cluster string // of registered instances
	filter  string // cluster Lookup and Watch keep; "" for all
	ttl     time.Duration
	mk      func() (naming_client.INamingClient, error) // nil when the user gave the client
	own     bool

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sends  sync.WaitGroup // SDK calls of sync and subscribe still running; Close waits for them

	// cache is the SDK's service cache, when the client is the SDK's own
	// (see subscription.apply); nil otherwise. Set before the client is
	// handed out.
	cache atomic.Pointer[naming_cache.ServiceInfoHolder]

	mu           sync.Mutex // never held while calling the SDK
	cli          naming_client.INamingClient
	cliErr       error
	creating     chan struct{}
	started      bool
	closed       bool
	disconnected bool // the SDK closed a connection; the next connect is a reconnect
	subs         map[string]*subscription
	nameLocks    map[string]*sync.Mutex // serialise SDK (un)subscribe per service
	svcs         map[string]*svcState

	hmu      sync.Mutex
	up       bool
	downGen  uint64 // incremented when the server becomes unreachable
	downErr  error
	healthCh chan struct{} // closed and replaced on every change
	// connGen is incremented when the SDK replaces its connection: the
	// server dropped the old one's subscriptions, and maybe (after its
	// restart) every client's instances, until they redo.
	connGen uint64
	// synced: the SDK is connected and has done its redo on this
	// connection (its lists are the server's). Cleared when the SDK is seen
	// not running or closes its connection, set after its redo.
	synced bool
}

// healthView is what health returns.
type healthView struct {
	up      bool // the server answers the probe
	synced  bool // see backend.synced
	gen     uint64
	connGen uint64
	changed <-chan struct{} // closed at the next change
	err     error           // why it is down
}

var (
	_ driver.Backend     = (*backend)(nil)
	_ driver.Pinger      = (*backend)(nil)
	_ driver.Publication = (*publication)(nil)
	_ driver.Stream      = (*stream)(nil)
)

func newBackend(cli naming_client.INamingClient, mk func() (naming_client.INamingClient, error), namespace string, o *Options) *backend {
	ctx, cancel := context.WithCancel(context.Background())
	b := &backend{
		log: o.Logger.With("backend", "nacos", "namespace", namespace, "group", o.Group), group: o.Group,
		cluster: o.Cluster, filter: o.Cluster, ttl: o.TTL, mk: mk, own: mk != nil, cli: cli,
		ctx: ctx, cancel: cancel,
		subs: map[string]*subscription{}, nameLocks: map[string]*sync.Mutex{}, svcs: map[string]*svcState{},
		up: true, synced: true, healthCh: make(chan struct{}),
	}
	if b.cluster == "" {
		b.cluster = DefaultCluster
	}
	return b
}

// client returns the SDK client, creating it on first use (Open never dials).
func (b *backend) client(ctx context.Context) (naming_client.INamingClient, error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, errClosed
	}
	if b.cli != nil {
		cli := b.cli
		start := !b.started
		if start {
			b.started = true
			b.wg.Add(2) // under mu, so never after Close's Wait began
			if h, ok := serviceCache(cli); ok {
				b.cache.Store(h)
			}
		}
		b.mu.Unlock()
		if start {
			b.start(cli)
		}
		return cli, nil
	}
	if b.cliErr != nil {
		err := b.cliErr
		b.mu.Unlock()
		return nil, err
	}
	if b.creating == nil {
		b.creating = make(chan struct{})
		b.wg.Add(1)
		go b.create(b.creating)
	}
	ch := b.creating
	b.mu.Unlock()
	select {
	case <-ch:
		return b.client(ctx)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// create makes the SDK client in the background: the SDK tries to connect
// for a few seconds before it returns.
func (b *backend) create(done chan struct{}) {
	defer b.wg.Done()
	cli, err := b.mk()
	b.mu.Lock()
	defer close(done)
	defer b.mu.Unlock()
	if b.closed {
		if cli != nil {
			b.wg.Add(1)
			go func() { defer b.wg.Done(); cli.CloseClient() }()
		}
		return
	}
	b.cli, b.cliErr = cli, err
}

// start begins the health probe and the maintenance loop (counted in wg by
// the caller), and hooks the SDK's connection events.
func (b *backend) start(cli naming_client.INamingClient) {
	rc, ok := rpcClient(cli)
	if ok {
		rc.RegisterConnectionListener(connListener{b})
		if !rc.IsRunning() {
			b.setSynced(false, false) // until its first connection is up and redone
		}
	} else {
		rc = nil
		b.log.Debug("nacos: cannot see the SDK's connection events; relying on pushed lists to notice lost registrations")
	}
	go b.probeLoop(cli)
	go b.maintain(cli, rc)
}

// spawn runs f in a goroutine counted in wg, unless the backend is closed.
func (b *backend) spawn(f func()) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		f()
	}()
	return true
}

// health reports whether the server answers, whether the SDK's lists are
// current, the down and connection generations, a channel closed at the
// next change, and why the server is down.
func (b *backend) health() healthView {
	b.hmu.Lock()
	defer b.hmu.Unlock()
	return healthView{up: b.up, synced: b.synced, gen: b.downGen, connGen: b.connGen, changed: b.healthCh, err: b.downErr}
}

// setSynced records whether the SDK is connected and done with its redo;
// replaced marks a new connection (see connGen).
func (b *backend) setSynced(synced, replaced bool) {
	b.hmu.Lock()
	defer b.hmu.Unlock()
	if b.synced == synced && !replaced {
		return
	}
	b.synced = synced
	if replaced {
		b.connGen++
	}
	close(b.healthCh)
	b.healthCh = make(chan struct{})
}

// watchSDK clears synced when the SDK is not running: it lost its
// connection, and whatever it holds may be stale until it reconnects and
// redoes (onConnected). The SDK has no event for the loss itself (it reports
// DISCONNECTED only once a new connection is up), so this is looked at on
// every maintenance tick.
func (b *backend) watchSDK(rc *rpc.RpcClient) {
	if rc != nil && !rc.IsRunning() {
		b.setSynced(false, false)
	}
}

func (b *backend) setHealth(up bool, err error) {
	b.hmu.Lock()
	defer b.hmu.Unlock()
	if b.up == up {
		if !up {
			b.downErr = err
		}
		return
	}
	b.up = up
	if up {
		b.downErr = nil
		b.log.Info("nacos: server answers again")
	} else {
		b.downGen++
		b.downErr = err
		b.log.Warn("nacos: server unreachable; watchers keep their last lists", "err", err)
	}
	close(b.healthCh)
	b.healthCh = make(chan struct{})
}

func (b *backend) probe(cli naming_client.INamingClient) error {
	_, err := cli.GetAllServicesInfo(vo.GetAllServiceInfoParam{GroupName: b.group, PageNo: 1, PageSize: 1})
	if err != nil {
		return fmt.Errorf("%w: nacos: %w", sdkErrKind(err), err)
	}
	return nil
}

// probeLoop asks the server a cheap question every probeInterval, one at a
// time. No answer for unreachableAfter makes the backend unreachable; no
// answer for the TTL makes every registration lost.
func (b *backend) probeLoop(cli naming_client.INamingClient) {
	defer b.wg.Done()
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	res := make(chan error, 1)
	inflight := false
	lastOK := time.Now()
	var lastErr error
	ttlLost := false
	for {
		select {
		case <-b.ctx.Done():
			return
		case err := <-res:
			inflight = false
			if err == nil {
				lastOK, lastErr, ttlLost = time.Now(), nil, false
				b.setHealth(true, nil)
			} else {
				lastErr = err
			}
		case <-t.C:
			if !inflight {
				inflight = true
				b.wg.Add(1)
				go func() { defer b.wg.Done(); res <- b.probe(cli) }()
			}
		}
		silent := time.Since(lastOK)
		if silent >= unreachableAfter {
			err := lastErr
			if err == nil {
				err = fmt.Errorf("%w: nacos: no answer from the server for %v", registry.ErrUnavailable, silent.Round(100*time.Millisecond))
			}
			b.setHealth(false, err)
		}
		if silent >= b.ttl && !ttlLost {
			ttlLost = true
			b.loseAll(fmt.Errorf("nacos: no answer from the server for %v (ttl %v)", silent.Round(100*time.Millisecond), b.ttl))
		}
	}
}

func (b *backend) Ping(ctx context.Context) error {
	cli, err := b.client(ctx)
	if err != nil {
		return err
	}
	res := make(chan error, 1)
	if !b.spawn(func() { res <- b.probe(cli) }) {
		return errClosed
	}
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// onDisconnected runs on the SDK's event goroutine when the SDK closed its
// connection (it does so only once a new one is up, or at shutdown).
func (b *backend) onDisconnected() {
	b.mu.Lock()
	b.disconnected = true
	b.mu.Unlock()
	b.setSynced(false, true)
}

// onConnected runs on the SDK's event goroutine after the SDK's own redo.
// After a disconnection, the old connection's instances are gone from the
// server: every publication is lost, and the supervisor's new publications
// find what the redo sent.
func (b *backend) onConnected() {
	b.mu.Lock()
	re := b.disconnected && !b.closed
	b.disconnected = false
	b.mu.Unlock()
	b.setSynced(true, false)
	if re {
		b.log.Info("nacos: the SDK reconnected; registrations are re-published")
		b.loseAll(errReconnected)
	}
}

// loseAll marks every publication lost.
func (b *backend) loseAll(err error) {
	var lost []*publication
	b.mu.Lock()
	for _, st := range b.svcs {
		for _, p := range st.pubs {
			lost = append(lost, p)
		}
	}
	b.mu.Unlock()
	for _, p := range lost {
		p.Lose(err)
	}
}

// maintain reaps unused subscriptions and resends what failed to be sent.
func (b *backend) maintain(cli naming_client.INamingClient, rc *rpc.RpcClient) {
	defer b.wg.Done()
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
		b.watchSDK(rc)
		now := time.Now()
		up := b.health().up
		var reap []*subscription
		var resend []*svcState
		b.mu.Lock()
		for name, s := range b.subs {
			if s.refs == 0 && now.Sub(s.idleSince) >= subLinger {
				delete(b.subs, name)
				reap = append(reap, s)
			}
		}
		for _, st := range b.svcs {
			if st.dirty && up && !now.Before(st.retryAt) {
				resend = append(resend, st)
			}
		}
		b.mu.Unlock()
		for _, s := range reap {
			s.unsubscribe(cli)
		}
		for _, st := range resend {
			if b.ctx.Err() != nil {
				return
			}
			if err := b.sync(b.ctx, cli, st, false); err != nil {
				b.log.Warn("nacos: resending registrations failed", "service", st.name, "err", err)
			}
			b.maybeDrop(st)
		}
	}
}

// Close stops the background work and closes the SDK client if the backend
// made it. With a client of the caller's, it withdraws what the backend left
// registered and drops its subscriptions.
func (b *backend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	cli := b.cli
	var subs []*subscription
	for _, s := range b.subs {
		subs = append(subs, s)
	}
	var svcs []*svcState
	for _, st := range b.svcs {
		svcs = append(svcs, st)
	}
	b.subs, b.svcs = map[string]*subscription{}, map[string]*svcState{}
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
	b.sends.Wait()
	if cli == nil {
		return nil
	}
	if b.own {
		cli.CloseClient() // the connection goes, and with it every instance
		return nil
	}
	var wg sync.WaitGroup
	for _, st := range svcs {
		b.mu.Lock()
		left := len(st.sent) > 0 || !st.sentValid
		st.desired = map[string]driver.Instance{}
		b.mu.Unlock()
		if left {
			wg.Add(1)
			go func() { defer wg.Done(); _ = b.sync(context.Background(), cli, st, true) }()
		}
	}
	for _, s := range subs {
		wg.Add(1)
		go func() { defer wg.Done(); s.unsubscribe(cli) }()
	}
	wg.Wait()
	b.sends.Wait()
	return nil
}

// sdkErrKind is the sentinel an SDK error wraps: registry.ErrPermission for
// the Nacos server's authentication and authorization refusals (its
// AccessException messages and the 403 code the SDK puts in its errors),
// registry.ErrUnavailable for everything else (the SDK reports no other
// kind of failure apart: timeouts, refused connections, "client not
// connected").
func sdkErrKind(err error) error {
	msg := strings.ToLower(err.Error())
	for _, s := range []string{"user not found", "unknown user", "authorization failed", "access denied", "no permission",
		"invalid username or password", "login failed", "403"} {
		if strings.Contains(msg, s) {
			return registry.ErrPermission
		}
	}
	return registry.ErrUnavailable
}
