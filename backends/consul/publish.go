package consul

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// SessionService is the name of the heartbeat services of registrars: each
// Registry that registers instances holds one, "rollcall-session~RANDOM",
// whose TTL check it renews, and its instances' checks alias it.
const SessionService = "rollcall-session"

// Why a publication is lost.
var (
	// ErrSessionGone: the agent no longer knows the registrar's session (the
	// agent restarted without its data, reaped the session, or someone
	// deregistered it or its check).
	ErrSessionGone = errors.New("consul: the agent no longer knows the registrar's session")
	// ErrSessionCritical: the session's TTL check was found critical (its
	// TTL lapsed, or someone marked it critical), so its instances had
	// disappeared from every watcher.
	ErrSessionCritical = errors.New("consul: the registrar's session check is critical")
	// ErrServiceGone: the agent no longer knows the instance's service
	// (someone deregistered it, or the agent reaped it).
	ErrServiceGone = errors.New("consul: the agent no longer knows the registration")

	errSessionLost = errors.New("session lost")
	errReplaced    = errors.New("consul: replaced by a newer registration of the same instance")
	errWithdrawn   = errors.New("consul: withdrawn")
)

// session is a registrar's heartbeat service and its TTL check; all the
// publications of a backend made while it lives alias it.
type session struct {
	driver.Loss
	sid, cid string
}

type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	sess        *session
	sid, cid    string // Consul service ID and its alias check's ID

	live bool // registered on the agent; guarded by b.mu
}

// session returns the live session, registering a new heartbeat if needed.
func (b *backend) session(ctx context.Context) (*session, error) {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	b.mu.Lock()
	cur, closed := b.sess, b.closed
	b.mu.Unlock()
	if closed {
		return nil, errClosed
	}
	if cur != nil && !cur.IsLost() {
		return cur, nil
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:]) // never fails
	reg := b.sessionRegistration(hex.EncodeToString(rnd[:]))
	if err := b.register(ctx, reg); err != nil {
		return nil, err
	}
	ss := &session{sid: reg.ID, cid: reg.Check.CheckID}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		_ = b.deregisterSession(ctx, ss)
		return nil, errClosed
	}
	b.sess = ss
	start := !b.renewing
	if start {
		b.renewing = true
		b.wg.Add(1)
	}
	b.mu.Unlock()
	if start {
		go b.renewLoop()
	}
	return ss, nil
}

// loseSession marks ss and every publication on it lost, and removes its
// heartbeat from the agent in the background.
func (b *backend) loseSession(ss *session, err error) {
	if ss.IsLost() {
		return
	}
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
	b.dropSession(ss)
}

// dropSession deregisters a lost session's heartbeat, best effort, in the
// background. Only goroutines of the backend's WaitGroup call it.
func (b *backend) dropSession(ss *session) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		_ = b.deregisterSession(b.ctx, ss)
	}()
}

func (b *backend) deregisterSession(ctx context.Context, ss *session) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.RequestTimeout)
	defer cancel()
	err := b.c.Agent().ServiceDeregisterOpts(ss.sid, (&api.QueryOptions{}).WithContext(ctx))
	if err == nil || isStatus(err, 404) {
		return nil
	}
	return fmt.Errorf("consul: removing session %s: %w", ss.sid, err)
}

func (b *backend) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	if _, err := b.registration(inst, ""); err != nil {
		return nil, err // invalid for Consul: fail before any request
	}
	ss, err := b.session(ctx)
	if err != nil {
		return nil, err
	}
	reg, err := b.registration(inst, ss.sid)
	if err != nil {
		return nil, err
	}
	p := &publication{b: b, sess: ss, sid: reg.ID, cid: reg.Check.CheckID}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, errClosed
	}
	old := b.pubs[p.sid]
	b.pubs[p.sid] = p
	b.mu.Unlock()
	if old != nil {
		old.Lose(errReplaced)
	}
	if err := b.register(ctx, reg); err != nil {
		b.forget(p)
		return nil, err
	}
	b.mu.Lock()
	p.live = true
	b.mu.Unlock()
	if ss.IsLost() { // lost while we were registering
		p.Lose(ss.Err())
	}
	return p, nil
}

// register sends an agent service registration; it replaces a registration
// with the same service ID, checks included.
func (b *backend) register(ctx context.Context, reg *api.AgentServiceRegistration) error {
	rctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(rctx)
	return b.wrap(ctx, "register", b.c.Agent().ServiceRegisterOpts(reg, opts))
}

// forget drops p from the backend's publications and reports whether it was
// the current publication of its service ID.
func (b *backend) forget(p *publication) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pubs[p.sid] != p {
		return false
	}
	delete(b.pubs, p.sid)
	return true
}

func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	reg, err := p.b.registration(inst, p.sess.sid)
	if err != nil {
		return err
	}
	if reg.ID != p.sid {
		return fmt.Errorf("consul: update of %s with another instance %s", p.sid, reg.ID)
	}
	return p.b.register(ctx, reg)
}

// Withdraw deregisters the service from the agent, unless a newer
// publication of the same instance replaced this one.
func (p *publication) Withdraw(ctx context.Context) error {
	owner := p.b.forget(p)
	p.Lose(errWithdrawn)
	if !owner {
		return nil
	}
	dctx, cancel := p.b.bound(ctx, p.b.opts.RequestTimeout)
	defer cancel()
	err := p.b.c.Agent().ServiceDeregisterOpts(p.sid, (&api.QueryOptions{}).WithContext(dctx))
	if isStatus(err, 404) {
		return nil // already gone: reaped, or the agent restarted
	}
	return p.b.wrap(ctx, "deregister", err)
}

// renewLoop renews the session every TTL/3, from the first session until
// Close.
func (b *backend) renewLoop() {
	defer b.wg.Done()
	t := time.NewTicker(max(b.ttl/3, time.Millisecond))
	defer t.Stop()
	failing := false
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
		err := b.renewRound()
		switch {
		case errors.Is(err, errSessionLost):
			b.log.Warn("consul: the session is lost; its instances are registered again", "err", err)
			failing = false
			continue
		case err != nil && !failing:
			b.log.Warn("consul: renewing the session failed; retrying every TTL/3", "err", err)
		case err == nil && failing:
			b.log.Info("consul: renewing the session works again")
		case err != nil:
			b.log.Debug("consul: renewing the session failed", "err", err)
		}
		failing = err != nil
	}
}

// renewRound makes one renewal, bounded by TTL/3, in two requests whatever
// the number of instances: it reads the states of the agent's TTL and alias
// checks, loses the session if its check is missing or critical and the
// publications whose check is missing, then renews the session's check.
func (b *backend) renewRound() error {
	b.mu.Lock()
	ss := b.sess
	// Publications registered before the states are read must be among
	// them: take the list first.
	var pubs []*publication
	if ss != nil {
		for _, p := range b.pubs {
			if p.sess == ss && p.live && !p.IsLost() {
				pubs = append(pubs, p)
			}
		}
	}
	b.mu.Unlock()
	if ss == nil || ss.IsLost() {
		return nil
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.ttl/3)
	defer cancel()
	states, err := b.checkStates(ctx)
	if err == nil {
		switch st, ok := states[ss.cid]; {
		case !ok:
			b.loseSession(ss, ErrSessionGone)
			return fmt.Errorf("%w: %w", errSessionLost, ErrSessionGone)
		case st == api.HealthCritical:
			b.loseSession(ss, ErrSessionCritical)
			return fmt.Errorf("%w: %w", errSessionLost, ErrSessionCritical)
		}
		for _, p := range pubs {
			if _, ok := states[p.cid]; !ok {
				p.Lose(ErrServiceGone)
			}
		}
	}
	// Renew even if the states could not be read: the renewal tells what
	// the agent knows too.
	rerr := b.c.Agent().UpdateTTLOpts(ss.cid, "", api.HealthPassing, (&api.QueryOptions{}).WithContext(ctx))
	if isStatus(rerr, 404) {
		b.loseSession(ss, ErrSessionGone)
		return fmt.Errorf("%w: %w", errSessionLost, ErrSessionGone)
	}
	if rerr != nil {
		return b.wrap(b.ctx, "renew session", rerr)
	}
	return err
}

// checkStates returns the status of the agent's TTL and alias checks, by
// check ID.
func (b *backend) checkStates(ctx context.Context) (map[string]string, error) {
	checks, err := b.c.Agent().ChecksWithFilterOpts(`Type == "ttl" or Type == "alias"`, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, b.wrap(b.ctx, "list checks", err)
	}
	m := make(map[string]string, len(checks))
	for id, c := range checks {
		if c != nil {
			m[id] = c.Status
		}
	}
	return m, nil
}
