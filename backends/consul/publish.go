package consul

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// SessionService is the name of the heartbeat services of registrars: each
// Registry that registers instances holds one, "rollcall-session~RANDOM",
// whose TTL check it renews, and its instances' checks alias it. A Registry
// with a prefix names it "PREFIX/rollcall-session".
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
	// ErrTakenOver: another registrar registered the same instance (service
	// and ID) on the agent, at the same address. It wraps
	// registry.ErrConflict; the instance is registered again once that
	// registrar's registration is no longer passing.
	ErrTakenOver = fmt.Errorf("consul: another live registrar on this agent took over the registration: %w", registry.ErrConflict)

	errSessionLost = errors.New("session lost")
	errReplaced    = errors.New("consul: replaced by a newer registration of the same instance")
	errWithdrawn   = errors.New("consul: withdrawn")
)

// Renewal retries: a renewal that failed quickly is retried after
// retryMin, doubling up to the renewal interval.
const retryMin = 100 * time.Millisecond

// maxWrites bounds the registrations and deregistrations a backend has in
// flight to its agent. The agent applies service writes one at a time under
// one lock, each persisted to its data directory, and a TTL renewal waits
// for that same lock: a burst of writes sent all at once only lengthens the
// agent's queue, and a renewal queued behind it can arrive after the TTL,
// failing every instance of the session. A test run saw renewals take 0.4 s
// at the median, with timeouts, while 24 writers registered on one agent.
// Renewals and reads do not take a slot.
const maxWrites = 2

// write runs f, an agent write, once one of the backend's maxWrites slots
// is free: waiting for one is bounded by ctx (the backend's own writes pass
// a context that ends with it; Close's writes must not be refused).
func (b *backend) write(ctx context.Context, what string, f func() error) error {
	select {
	case b.writes <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("consul: %s: waiting for one of this registry's %d writes in flight to the agent: %w", what, maxWrites, ctx.Err())
	}
	defer func() { <-b.writes }()
	return f()
}

// session is a registrar's heartbeat service and its TTL check; all the
// publications of a backend made while it lives alias it.
type session struct {
	driver.Loss
	sid, cid string
	node, dc string // the agent's node name and datacenter; empty if they could not be read
}

type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	sess        *session
	sid, cid    string // Consul service ID and its alias check's ID
	name        string // Consul service name

	live bool // registered on the agent; guarded by b.mu
	// stuck counts consecutive renewal rounds that found the instance's
	// check critical while the session's passed; renewLoop's only.
	stuck int
}

// ErrCheckStuck: the instance's alias check stayed critical while the
// session's check it mirrors passed. Consul's node-local alias checks are
// edge-triggered (agent/checks/alias.go: a missed edge is corrected by a
// refresh once a minute), and an agent restarted with its data can start an
// alias check after the renewal that made the session pass: the instance
// then stays invisible though everything is renewed. It is registered
// again, which restarts its alias check.
var ErrCheckStuck = errors.New("consul: the instance's alias check stayed critical while the session's check passed")

// stuckRounds is how many consecutive renewal rounds must find an instance's
// check critical, with the session's passing, before it is registered
// again: an alias takes the session's status within moments, so two rounds
// (TTL/3 apart) are not a transition.
const stuckRounds = 2

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
	// The agent's node name and datacenter, for reading its registrations
	// in the catalog (it needs no ACL right beyond reading the session).
	if info, err := b.localHealth(ctx, ss.sid); err == nil && info != nil {
		if len(info.Checks) > 0 && info.Checks[0] != nil {
			ss.node = info.Checks[0].Node
		}
		if info.Service != nil {
			ss.dc = info.Service.Datacenter
		}
	}
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

// localHealth reads the agent's own registration of the Consul service ID
// sid with its checks: nil, nil when the agent has none. The agent answers
// 200, 429 or 503 for a passing, warning or critical service: the status is
// in AggregatedStatus.
func (b *backend) localHealth(ctx context.Context, sid string) (*api.AgentServiceChecksInfo, error) {
	qctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	var info api.AgentServiceChecksInfo
	_, err := b.c.Raw().Query("/v1/agent/health/service/id/"+sid, &info, (&api.QueryOptions{}).WithContext(qctx))
	switch {
	case err == nil:
		return &info, nil
	case isStatus(err, http.StatusNotFound):
		return nil, nil
	case isStatus(err, http.StatusTooManyRequests):
		return &api.AgentServiceChecksInfo{AggregatedStatus: api.HealthWarning}, nil
	case isStatus(err, http.StatusServiceUnavailable):
		return &api.AgentServiceChecksInfo{AggregatedStatus: api.HealthCritical}, nil
	}
	return nil, b.wrap(ctx, "reading registration "+sid, err)
}

// loseSession marks ss and every publication on it lost, and fails its
// heartbeat in the background (see dropSession).
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

// dropSession fails a lost session's heartbeat, best effort, in the
// background, so that any instance still aliasing it (one whose
// re-registration has not happened yet, or fails) is critical, not passing.
// The heartbeat is not removed: the agent does not re-evaluate alias checks
// reliably when their service goes (see Close); it reaps the failed heartbeat
// after deregister_after. A session whose check is gone is removed. Only
// goroutines of the backend's WaitGroup call it.
func (b *backend) dropSession(ss *session) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		if errors.Is(ss.Err(), ErrSessionGone) {
			// Its check is gone: a heartbeat service left without one
			// would never be reaped (and its aliases pass: "no checks
			// found"), so it is removed.
			_ = b.deregisterSession(b.ctx, ss)
			return
		}
		_ = b.failSession(b.ctx, ss)
	}()
}

// failSession marks the session's TTL check critical.
func (b *backend) failSession(ctx context.Context, ss *session) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.RequestTimeout)
	defer cancel()
	err := b.c.Agent().UpdateTTLOpts(ss.cid, "rollcall: the registrar gave this session up", api.HealthCritical, (&api.QueryOptions{}).WithContext(ctx))
	if err == nil || isStatus(err, 404) {
		return nil
	}
	return fmt.Errorf("consul: failing session %s: %w", ss.sid, err)
}

func (b *backend) deregisterSession(ctx context.Context, ss *session) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.RequestTimeout)
	defer cancel()
	err := b.write(ctx, "removing session "+ss.sid, func() error {
		return b.c.Agent().ServiceDeregisterOpts(ss.sid, (&api.QueryOptions{}).WithContext(ctx))
	})
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
	if err := b.claim(ctx, ss, reg); err != nil {
		return nil, err
	}
	p := &publication{b: b, sess: ss, sid: reg.ID, cid: reg.Check.CheckID, name: reg.Name}
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
		b.abandon(p) // a registration that timed out may still land
		return nil, err
	}
	if err := b.visible(ctx, ss, reg); err != nil {
		b.abandon(p)
		return nil, err
	}
	b.mu.Lock()
	p.live = true
	delete(b.takenOver, p.sid)
	b.mu.Unlock()
	if ss.IsLost() { // lost while we were registering
		p.Lose(ss.Err())
	}
	return p, nil
}

// abandon drops p, whose Publish failed after its registration was sent,
// and removes that registration from the agent, which may hold it (the
// registration went through, or timed out and lands later): nobody holds a
// Registration to deregister it, and it aliases the live session, so it
// would pass for as long as the session is renewed. The removal runs in the
// background, at once and then with a backoff from retryMin up to the
// renewal interval, until the agent confirms it or the backend closes (Close
// then fails the session instead of removing it, so that what is left is
// critical). It leaves a registration alone that another registrar holds, or
// that a newer publication of the same instance made before the removal
// looked; one made while the removal is in flight may be removed, which the
// next renewal round finds (ErrServiceGone) and package registry repairs.
func (b *backend) abandon(p *publication) {
	p.Lose(errWithdrawn)
	if !b.forget(p) {
		return // replaced: the newer publication owns the service ID
	}
	b.mu.Lock()
	b.abandoned++
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.wg.Add(1)
	b.mu.Unlock()
	go func() {
		defer b.wg.Done()
		delay := retryMin
		for {
			err := b.removeAbandoned(p)
			if err == nil {
				b.mu.Lock()
				b.abandoned--
				b.mu.Unlock()
				return
			}
			b.log.Debug("consul: removing the registration of a failed Publish", "service_id", p.sid, "err", err)
			t := time.NewTimer(delay)
			select {
			case <-b.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			delay = min(2*delay, max(b.ttl/3, retryMin))
		}
	}()
}

// removeAbandoned deregisters the abandoned publication p's service from the
// agent if the agent holds it with p's check and no newer publication of
// the same service ID exists.
func (b *backend) removeAbandoned(p *publication) error {
	info, err := b.localHealth(b.ctx, p.sid)
	if err != nil {
		return err
	}
	if info == nil || info.Service == nil || !ownCheck(info.Checks, p.cid) {
		return nil // never landed, gone, or another registrar's
	}
	b.mu.Lock()
	newer := b.pubs[p.sid] != nil
	b.mu.Unlock()
	if newer {
		return nil // registered again since: that registration is live
	}
	ctx, cancel := b.bound(b.ctx, b.opts.RequestTimeout)
	defer cancel()
	err = b.write(ctx, "deregister", func() error {
		return b.c.Agent().ServiceDeregisterOpts(p.sid, (&api.QueryOptions{}).WithContext(ctx))
	})
	if err != nil && !isStatus(err, 404) {
		return b.wrap(b.ctx, "deregister", err)
	}
	return nil
}

// claim checks, before reg is written, that no other live registrar holds
// the instance (see Duplicate IDs in the package doc): on this agent, a
// passing registration of the same service ID whose check is not this
// session's alias; on other nodes, a passing catalog entry with the same
// service ID. A holder at another address is a conflict; at the same address
// it is taken over, unless it took the instance from this backend.
func (b *backend) claim(ctx context.Context, ss *session, reg *api.AgentServiceRegistration) error {
	addr := net.JoinHostPort(reg.Address, strconv.Itoa(reg.Port))
	info, err := b.localHealth(ctx, reg.ID)
	if err != nil {
		return err
	}
	if info != nil && info.AggregatedStatus == api.HealthPassing && info.Service != nil && !ownCheck(info.Checks, reg.Check.CheckID) {
		held := net.JoinHostPort(info.Service.Address, strconv.Itoa(info.Service.Port))
		b.mu.Lock()
		taken := b.takenOver[reg.ID]
		b.mu.Unlock()
		switch {
		case held != addr:
			return fmt.Errorf("consul: register %s at %s: %w: a live registration on this agent has it at %s", reg.ID, addr, registry.ErrConflict, held)
		case taken:
			return fmt.Errorf("consul: register %s: %w: another live registrar took it over at the same address; it is taken back once that registration stops passing", reg.ID, registry.ErrConflict)
		}
	}
	if ss.node == "" {
		return nil // the node is not known: other nodes cannot be told apart
	}
	qctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	q := &api.QueryOptions{Filter: fmt.Sprintf("Service.ID == %q and Node.Node != %q", reg.ID, ss.node), Datacenter: ss.dc}
	entries, _, err := b.c.Health().Service(reg.Name, "", true, q.WithContext(qctx))
	if err != nil {
		return b.wrap(ctx, "register", err)
	}
	for _, e := range entries {
		if e.Service == nil || e.Node == nil {
			continue
		}
		host := e.Service.Address
		if host == "" {
			host = e.Node.Address
		}
		if held := net.JoinHostPort(host, strconv.Itoa(e.Service.Port)); held != addr {
			return fmt.Errorf("consul: register %s at %s: %w: a live registration on node %s has it at %s", reg.ID, addr, registry.ErrConflict, e.Node.Node, held)
		}
	}
	return nil
}

// ownCheck reports whether checks hold the check ID cid.
func ownCheck(checks api.HealthChecks, cid string) bool {
	for _, c := range checks {
		if c != nil && c.CheckID == cid {
			return true
		}
	}
	return false
}

// register sends an agent service registration; it replaces a registration
// with the same service ID, checks included.
func (b *backend) register(ctx context.Context, reg *api.AgentServiceRegistration) error {
	return b.write(ctx, "register", func() error {
		rctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
		defer cancel()
		opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(rctx)
		return b.wrap(ctx, "register", b.c.Agent().ServiceRegisterOpts(reg, opts))
	})
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
	if err := p.b.register(ctx, reg); err != nil {
		return err
	}
	return p.b.visible(ctx, p.sess, reg)
}

// visible waits until the catalog lists reg as the agent registered it:
// passing, with its check and its address, tags, metadata and weight. The
// agent answers a registration before it has synced it to the catalog
// (anti-entropy, a few milliseconds later), and List and Watch read the
// catalog: Publish and Update return once they would see it. It reads the
// instance alone, in the agent's datacenter, from index 0 and then with
// blocking queries, bounded by ctx. near=_agent keeps these queries off the
// agent's streaming backend, which does not say when ACLs hid an entry: a
// registrar's token without node:read cannot see its own registration, and
// then there is nothing to wait for.
func (b *backend) visible(ctx context.Context, ss *session, reg *api.AgentServiceRegistration) error {
	filter := fmt.Sprintf("Service.ID == %q", reg.ID)
	if ss.node != "" {
		filter += fmt.Sprintf(" and Node.Node == %q", ss.node)
	}
	var index uint64
	for {
		qctx, cancel := b.bound(ctx, b.wait+b.wait/16+time.Second)
		q := &api.QueryOptions{Filter: filter, Datacenter: ss.dc, Near: "_agent", WaitIndex: index, WaitTime: b.wait}
		entries, meta, err := b.c.Health().Service(reg.Name, "", true, q.WithContext(qctx))
		cancel()
		if err != nil {
			return b.wrap(ctx, "waiting for "+reg.ID+" in the catalog", err)
		}
		for _, e := range entries {
			if synced(e, reg) {
				return nil
			}
		}
		if meta.ResultsFilteredByACLs {
			return nil // registered; this token may not see it
		}
		// Index rules as in a watch: never below 1, from 0 when it goes
		// backwards.
		if idx := max(meta.LastIndex, 1); idx < index {
			index = 0
		} else {
			index = idx
		}
	}
}

// invisible waits until the catalog no longer lists the service sid of this
// agent's node, passing or not, as visible waits for it to be listed.
func (b *backend) invisible(ctx context.Context, ss *session, name, sid string) error {
	filter := fmt.Sprintf("Service.ID == %q", sid)
	if ss.node != "" {
		filter += fmt.Sprintf(" and Node.Node == %q", ss.node)
	}
	var index uint64
	for {
		qctx, cancel := b.bound(ctx, b.wait+b.wait/16+time.Second)
		q := &api.QueryOptions{Filter: filter, Datacenter: ss.dc, Near: "_agent", WaitIndex: index, WaitTime: b.wait}
		entries, meta, err := b.c.Health().Service(name, "", false, q.WithContext(qctx))
		cancel()
		if err != nil {
			return b.wrap(ctx, "waiting for "+sid+" to leave the catalog", err)
		}
		if len(entries) == 0 {
			return nil
		}
		if idx := max(meta.LastIndex, 1); idx < index {
			index = 0
		} else {
			index = idx
		}
	}
}

// synced reports whether the catalog entry e is the registration reg.
func synced(e *api.ServiceEntry, reg *api.AgentServiceRegistration) bool {
	s := e.Service
	if s == nil || s.ID != reg.ID || s.Address != reg.Address || s.Port != reg.Port ||
		!slices.Equal(s.Tags, reg.Tags) || !maps.Equal(s.Meta, reg.Meta) ||
		reg.Weights != nil && s.Weights.Passing != reg.Weights.Passing {
		return false
	}
	return ownCheck(e.Checks, reg.Check.CheckID)
}

// Withdraw deregisters the service from the agent, unless a newer
// publication of the same instance replaced this one or another registrar
// holds it now. It may be repeated after it failed: the publication stays
// the backend's until the agent confirmed.
func (p *publication) Withdraw(ctx context.Context) error {
	b := p.b
	p.Lose(errWithdrawn) // no renewal round looks at it any more
	b.mu.Lock()
	owner := b.pubs[p.sid] == p
	b.mu.Unlock()
	if !owner {
		return nil // replaced, or withdrawn already
	}
	info, err := b.localHealth(ctx, p.sid)
	if err != nil {
		return err
	}
	if info != nil && info.Service != nil && !ownCheck(info.Checks, p.cid) {
		// Another registrar's now (or someone else's): not ours to remove.
		b.forget(p)
		return nil
	}
	if info != nil {
		err = b.write(ctx, "deregister", func() error {
			dctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
			defer cancel()
			return b.c.Agent().ServiceDeregisterOpts(p.sid, (&api.QueryOptions{}).WithContext(dctx))
		})
		if err != nil && !isStatus(err, 404) { // 404: already gone
			return b.wrap(ctx, "deregister", err)
		}
	}
	// List and Watch read the catalog, which the agent updates after its
	// own state: a deregistration it applied after its request timed out
	// (a paused agent) leaves its state without the service while the
	// catalog still lists it, and the retry finds nothing to deregister.
	// Withdraw returns once List and Watch would no longer see it.
	if err := b.invisible(ctx, p.sess, p.name, p.sid); err != nil {
		return err
	}
	b.forget(p)
	b.mu.Lock()
	delete(b.takenOver, p.sid)
	b.mu.Unlock()
	return nil
}

// renewLoop renews the session every TTL/3, from the first session until
// Close: a round starts TTL/3 after the previous one started, however long
// that one took (a slow agent must not stretch the interval on top of its
// own delay). A failed renewal is retried before the next one is due: at once
// after a timeout (the round has waited already), otherwise after a backoff
// growing from retryMin; the retry renews first (see renewRound).
func (b *backend) renewLoop() {
	defer b.wg.Done()
	interval := max(b.ttl/3, time.Millisecond)
	t := time.NewTimer(interval)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		err := b.renewRound(failures > 0)
		switch {
		case errors.Is(err, errSessionLost):
			b.log.Warn("consul: the session is lost; its instances are registered again", "err", err)
			failures = 0
		case err != nil && failures == 0:
			b.log.Warn("consul: renewing the session failed; retrying", "err", err)
		case err == nil && failures > 0:
			b.log.Info("consul: renewing the session works again", "failed_rounds", failures)
		case err != nil:
			b.log.Debug("consul: renewing the session failed", "err", err)
		}
		next := interval
		if err != nil && !errors.Is(err, errSessionLost) {
			failures++
			next = min(interval, retryMin<<min(failures-1, 20))
		} else {
			failures = 0
		}
		t.Reset(max(0, next-time.Since(start)))
	}
}

// renewRound makes one renewal in two requests whatever the number of
// instances, each bounded by TTL/3: it reads the states of the agent's TTL
// and alias checks, loses the session if its check is missing or critical
// and the publications whose check is missing, then renews the session's
// check. The renewal has its own TTL/3, not what the read left of it.
//
// After a failed round (retry), it renews first and reads after, only once
// that renewal succeeded (one that failed may still land): the agent
// could not be reached, so a TTL that lapsed meanwhile lapsed because the
// agent could not hear the renewals, and the renewal, in flight when the
// agent answers again, makes the instances pass again within moments
// instead of after a re-registration. A check still critical after that
// renewal was failed by the expiry racing it, and is renewed once more.
func (b *backend) renewRound(retry bool) error {
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
	renew := func() error {
		ctx, cancel := context.WithTimeout(b.ctx, b.ttl/3)
		defer cancel()
		err := b.c.Agent().UpdateTTLOpts(ss.cid, "", api.HealthPassing, (&api.QueryOptions{}).WithContext(ctx))
		switch {
		case err == nil:
			return nil
		case isStatus(err, 404):
			b.loseSession(ss, ErrSessionGone)
			return fmt.Errorf("%w: %w", errSessionLost, ErrSessionGone)
		}
		err = b.wrap(b.ctx, "renew session", err)
		if errors.Is(err, registry.ErrPermission) {
			b.loseSession(ss, err)
			return fmt.Errorf("%w: %w", errSessionLost, err)
		}
		return err
	}
	var rerr error
	if retry {
		// A renewal that failed again may still land (a paused agent
		// resuming answers it a moment later): the states are read only
		// after one the agent confirmed.
		if rerr = renew(); rerr != nil {
			return rerr
		}
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.ttl/3)
	states, err := b.checkStates(ctx)
	cancel()
	if err == nil {
		switch st, ok := states.status[ss.cid]; {
		case !ok:
			b.loseSession(ss, ErrSessionGone)
			return fmt.Errorf("%w: %w", errSessionLost, ErrSessionGone)
		case st == api.HealthCritical && !retry:
			b.loseSession(ss, ErrSessionCritical)
			return fmt.Errorf("%w: %w", errSessionLost, ErrSessionCritical)
		case st == api.HealthCritical:
			retry = false // renewed, then expired: renew again below
		}
		var taken []string
		// A critical node check (serfHealth, maintenance) or another
		// critical check of the session's service fails the alias too.
		sessionPassing := states.status[ss.cid] == api.HealthPassing && !states.blocking[""] && !states.blocking[ss.sid]
		for _, p := range pubs {
			if st, ok := states.status[p.cid]; ok {
				if st == api.HealthCritical && sessionPassing {
					if p.stuck++; p.stuck >= stuckRounds {
						p.Lose(ErrCheckStuck)
					}
				} else {
					p.stuck = 0
				}
				continue
			}
			if states.services[p.sid] {
				taken = append(taken, p.sid)
				p.Lose(ErrTakenOver)
			} else {
				p.Lose(ErrServiceGone)
			}
		}
		if len(taken) > 0 {
			b.mu.Lock()
			for _, sid := range taken {
				b.takenOver[sid] = true
			}
			b.mu.Unlock()
		}
	}
	if !retry {
		// Renew even if the states could not be read: the renewal tells
		// what the agent knows too.
		rerr = renew()
	}
	if rerr != nil {
		return rerr
	}
	return err
}

// checks is what checkStates reads.
type checks struct {
	status   map[string]string // TTL and alias checks, by check ID
	services map[string]bool   // service IDs that have a TTL or alias check
	blocking map[string]bool   // service IDs ("" for the node) with another check that is critical
}

// checkStates returns the status of the agent's TTL and alias checks, by
// check ID, and the service IDs they belong to; and which of the sessions'
// services, and whether the node, have another critical check (an alias
// check mirrors those too).
func (b *backend) checkStates(ctx context.Context) (checks, error) {
	filter := fmt.Sprintf(`Type == "ttl" or Type == "alias" or ServiceID == "" or ServiceName == %q`, b.name(SessionService))
	list, err := b.c.Agent().ChecksWithFilterOpts(filter, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return checks{}, b.wrap(b.ctx, "list checks", err)
	}
	c := checks{status: make(map[string]string, len(list)), services: make(map[string]bool, len(list)), blocking: map[string]bool{}}
	for id, ck := range list {
		switch {
		case ck == nil:
		case ck.Type == "ttl" || ck.Type == "alias":
			c.status[id] = ck.Status
			if ck.ServiceID != "" {
				c.services[ck.ServiceID] = true
			}
		case ck.Status == api.HealthCritical:
			c.blocking[ck.ServiceID] = true
		}
	}
	return c, nil
}
