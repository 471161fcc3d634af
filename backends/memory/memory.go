// Package memory is rollcall's in-process backend, scheme mem://. It has the
// same semantics as the network backends (instances bound to a lease with a
// TTL and renewed by keepalives, watches with a reset then changes) and fault
// controls on its Server, so it is both the semantic reference and the
// double for unit tests of code that uses package registry.
//
// URL form:
//
//	mem://NAME?ttl=10s
//
// Every mem:// URL with the same NAME, in one process, opens the same Server
// (NamedServer). The only parameter is ttl, the lease TTL (default 10s).
//
// Registry.Services lists the services of the client's namespace that have
// entries.
package memory

import (
	"context"
	"errors"
	"net/url"
	"sync"
	"time"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "mem"

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

func openURL(ctx context.Context, u *url.URL) (registry.Registry, error) {
	p := registry.NewURLParams(u)
	ttl := p.Duration("ttl", driver.DefaultTTL)
	if err := p.Err(); err != nil {
		return nil, err
	}
	if u.Path != "" && u.Path != "/" || u.User != nil {
		return nil, errors.Join(registry.ErrInvalidURL, errors.New("memory: URL form is mem://NAME?ttl=10s"))
	}
	return New(NamedServer(u.Host), &Options{TTL: ttl}), nil
}

// Options configure a memory Registry.
type Options struct {
	// TTL of the lease that registrations are bound to; driver.DefaultTTL
	// when zero. Keepalives go every TTL/3.
	TTL time.Duration
	// Namespace scopes the client: registries in different namespaces of
	// one Server never see each other's instances (also when one name is a
	// prefix of the other). Empty is the default namespace, the one
	// Server.Put and Server.Delete write to.
	Namespace string
	// User is who the client authenticates as; the Server refuses the calls
	// of users it restricts (Server.Restrict). Empty is an unrestricted
	// client.
	User string
	// Registry configures the shared layer (logger, backoff).
	Registry registry.Options
}

// Registry is a registry.Registry over a Server, with Crash for tests.
type Registry struct {
	registry.Registry
	b *backend
}

// New returns a Registry that talks to srv.
func New(srv *Server, opts *Options) *Registry {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.TTL <= 0 {
		o.TTL = driver.DefaultTTL
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &backend{s: srv, ttl: o.TTL, ns: o.Namespace, user: o.User, ctx: ctx, cancel: cancel, pubs: map[[2]string]*publication{}}
	return &Registry{Registry: registry.New(b, &o.Registry), b: b}
}

// Unwrap returns the shared layer's Registry, for registry.Open.
func (r *Registry) Unwrap() registry.Registry { return r.Registry }

// Crash stops r as a crashed process stops: its keepalives end and nothing
// is deregistered or revoked, so its instances disappear when their lease
// expires. r is closed afterwards.
func (r *Registry) Crash() {
	r.b.crash()
	_ = r.Close()
}

type backend struct {
	s      *Server
	ttl    time.Duration
	ns     string // namespace (Options.Namespace)
	user   string // Options.User
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	sessMu sync.Mutex // held while granting a lease; never under mu

	mu      sync.Mutex // never held while calling the server
	crashed bool
	sess    *session
	pubs    map[[2]string]*publication // by the server's key: scope, ID
}

var (
	_ driver.Backend       = (*backend)(nil)
	_ driver.Pinger        = (*backend)(nil)
	_ driver.ServiceLister = (*backend)(nil)
	_ driver.Publication   = (*publication)(nil)
)

// session is one lease and its keepalive loop; all publications of a
// backend share it.
type session struct {
	id int64
	driver.Loss
}

var errCrashed = errors.New("memory: client crashed")

// session returns the live session, granting a new lease if needed.
func (b *backend) session(ctx context.Context) (*session, error) {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	b.mu.Lock()
	cur, crashed := b.sess, b.crashed
	b.mu.Unlock()
	if crashed {
		return nil, errCrashed
	}
	if cur != nil && !cur.IsLost() {
		return cur, nil
	}
	ss := &session{}
	id, err := b.s.grant(ctx, b.user, b.ttl, func(err error) { b.loseSession(ss, err) }, b.keyGone)
	if err != nil {
		return nil, err
	}
	ss.id = id
	b.mu.Lock()
	b.sess = ss
	b.mu.Unlock()
	b.wg.Add(1)
	go b.keepAlive(ss)
	return ss, nil
}

// loseSession marks the session and every publication on it lost.
func (b *backend) loseSession(ss *session, err error) {
	ss.Lose(err)
	b.mu.Lock()
	var lost []*publication
	for _, p := range b.pubs {
		if p.sess == ss {
			lost = append(lost, p)
		}
	}
	b.mu.Unlock()
	for _, p := range lost {
		p.Lose(err)
	}
}

// keepAlive renews the lease every TTL/3. While the server is unreachable it
// keeps trying; once the server says the lease is gone the session is lost.
func (b *backend) keepAlive(ss *session) {
	defer b.wg.Done()
	ctx := b.ctx
	t := time.NewTicker(b.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ss.Lost():
			return
		case <-t.C:
		}
		kctx, cancel := context.WithTimeout(ctx, b.ttl/3)
		err := b.s.keepAlive(kctx, b.user, ss.id)
		cancel()
		if errors.Is(err, ErrLeaseNotFound) {
			b.loseSession(ss, err)
			return
		}
	}
}

// keyGone is called by the server, under its lock, when an entry of ours is
// deleted or replaced by someone else.
func (b *backend) keyGone(k [2]string) {
	b.mu.Lock()
	p := b.pubs[k]
	b.mu.Unlock()
	if p != nil {
		p.Lose(ErrKeyGone)
	}
}

func (b *backend) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	ss, err := b.session(ctx)
	if err != nil {
		return nil, err
	}
	k := [2]string{scope(b.ns, inst.Service), inst.ID}
	p := &publication{b: b, key: k, sess: ss}
	b.mu.Lock()
	old := b.pubs[k]
	b.pubs[k] = p
	b.mu.Unlock()
	if old != nil {
		old.Lose(errors.New("memory: replaced by a newer registration"))
	}
	if err := b.s.put(ctx, b.user, ss.id, k[0], inst); err != nil {
		b.forget(p)
		if errors.Is(err, ErrLeaseNotFound) {
			b.loseSession(ss, err)
		}
		return nil, err
	}
	if ss.IsLost() { // lost while we were publishing
		p.Lose(ss.Err())
	}
	return p, nil
}

func (b *backend) forget(p *publication) {
	b.mu.Lock()
	if b.pubs[p.key] == p {
		delete(b.pubs, p.key)
	}
	b.mu.Unlock()
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	return b.s.list(ctx, b.user, scope(b.ns, service))
}

func (b *backend) Watch(ctx context.Context, service string) (driver.Stream, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	return b.s.watch(ctx, b.user, scope(b.ns, service))
}

func (b *backend) Services(ctx context.Context) ([]string, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	return b.s.services(ctx, b.user, b.ns)
}

func (b *backend) Ping(ctx context.Context) error {
	if err := b.s.enter(ctx, "", "ping"); err != nil {
		return err
	}
	b.s.mu.Unlock()
	return nil
}

func (b *backend) isCrashed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.crashed
}

func (b *backend) crash() {
	b.mu.Lock()
	b.crashed = true
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
}

// Close revokes the lease and stops the keepalives.
func (b *backend) Close() error {
	b.mu.Lock()
	ss, crashed := b.sess, b.crashed
	b.sess = nil
	b.mu.Unlock()
	var err error
	if ss != nil && !crashed {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err = b.s.revoke(ctx, b.user, ss.id)
		cancel()
	}
	b.cancel()
	b.wg.Wait()
	return err
}

type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	key         [2]string
	sess        *session
}

func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	if p.b.isCrashed() {
		return errCrashed
	}
	return p.b.s.put(ctx, p.b.user, p.sess.id, p.key[0], inst)
}

func (p *publication) Withdraw(ctx context.Context) error {
	p.b.forget(p)
	p.Lose(errors.New("memory: withdrawn"))
	if p.b.isCrashed() {
		// A crashed process withdraws nothing and retries nothing (Crash
		// closes the Registry only to release it): what it held goes when
		// its lease expires.
		return nil
	}
	return p.b.s.remove(ctx, p.b.user, p.sess.id, p.key[0], p.key[1])
}
