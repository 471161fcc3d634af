package registry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Registration is a registered instance kept alive by a supervisor: after the
// lease or session is lost, the registry restarts or wipes its data, or
// someone deletes the entry, it registers the instance again, retrying with
// capped, jittered backoff for as long as the Registration lives. Deregister
// is supervised the same way: a withdrawal that fails is retried until it
// succeeds or the Registry closes. It is safe for concurrent use.
type Registration struct {
	r      *registry
	ctx    context.Context // canceled by Deregister and registry Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the supervisor has exited

	opMu sync.Mutex // serialises Update, re-registration and Deregister

	mu          sync.Mutex
	inst        Instance
	pub         driver.Publication // nil while lost
	lost        driver.Publication // the lost publication, until replaced
	status      Status
	closed      bool          // Deregister was called
	withdrawn   chan struct{} // closed once the withdrawal has ended; nil before Deregister
	withdrawErr error         // why the withdrawal ended without success (registry closed), or nil
	changed     chan struct{} // closed and replaced when status.State changes
}

// State is the state of a Registration.
type State int

const (
	// Registered: the instance is published.
	Registered State = iota
	// Retrying: the publication was lost (or refused: Status.Err says why)
	// and the supervisor is registering the instance again.
	Retrying
	// Deregistered: the instance was withdrawn, or the registry closed.
	Deregistered
	// Withdrawing: Deregister was called and the withdrawal has not
	// succeeded yet (Status.Err says why); it is retried until it succeeds
	// or the registry closes.
	Withdrawing
)

func (s State) String() string {
	switch s {
	case Registered:
		return "registered"
	case Retrying:
		return "retrying"
	case Deregistered:
		return "deregistered"
	case Withdrawing:
		return "withdrawing"
	}
	return "unknown"
}

// Status reports a Registration's state.
type Status struct {
	State State
	// Err is why the last publication was lost, the last failed attempt to
	// publish again, or the last failed attempt to withdraw; nil while
	// Registered. errors.Is(Err, ErrPermission) and errors.Is(Err,
	// ErrConflict) tell a refusal from an outage (ErrUnavailable).
	Err error
	// Since is when State last changed.
	Since time.Time
	// Reregistrations counts successful re-registrations.
	Reregistrations int
}

// String describes the status for logs and command lines, as in
// "retrying since 15:04:05 (2 re-registrations): registry: unavailable: ...".
func (s Status) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s since %s", s.State, s.Since.Format("15:04:05"))
	if s.Reregistrations > 0 {
		fmt.Fprintf(&b, " (%d re-registrations)", s.Reregistrations)
	}
	if s.Err != nil {
		fmt.Fprintf(&b, ": %v", s.Err)
	}
	return b.String()
}

func newRegistration(r *registry, inst Instance, pub driver.Publication) *Registration {
	ctx, cancel := context.WithCancel(r.ctx)
	return &Registration{r: r, ctx: ctx, cancel: cancel, done: make(chan struct{}), inst: inst, pub: pub,
		status: Status{State: Registered, Since: time.Now()}, changed: make(chan struct{})}
}

// StatusChanged returns a channel that is closed when the registration's
// State next changes; then call Status, and StatusChanged again for the
// change after. Nothing waits for the reader: the supervisor never blocks
// on it.
func (g *Registration) StatusChanged() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.changed
}

// transitionLocked records that the State changes to s.
func (g *Registration) transitionLocked(s State) {
	if g.status.State == s {
		return
	}
	g.status.State, g.status.Since = s, time.Now()
	close(g.changed)
	g.changed = make(chan struct{})
}

// Instance returns the registered instance.
func (g *Registration) Instance() Instance {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.inst.Clone()
}

// Status returns the registration's current state.
func (g *Registration) Status() Status {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.status
}

func (g *Registration) setStatus(s State, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.transitionLocked(s)
	g.status.Err = err
}

// supervise waits for the publication to be lost and publishes again.
// Backoff grows across consecutive losses: a publication that is lost again
// soon after it was made (another registrar fighting over the ID, a server
// that accepts writes but drops them) is republished later each time.
func (g *Registration) supervise() {
	defer g.r.wg.Done()
	defer close(g.done)
	log := g.r.log
	streak := 0 // consecutive losses of short-lived publications
	since := time.Now()
	for {
		g.mu.Lock()
		pub := g.pub
		g.mu.Unlock()
		select {
		case <-g.ctx.Done():
			return
		case <-pub.Lost():
		}
		err := pub.Err()
		if g.ctx.Err() != nil {
			return
		}
		if time.Since(since) >= g.r.opts.Backoff.Max {
			streak = 0 // it had been fine for a while: start over
		}
		g.mu.Lock()
		if g.pub == pub {
			g.pub, g.lost = nil, pub
		}
		inst := g.inst
		g.mu.Unlock()
		g.setStatus(Retrying, err)
		log.Warn("registry: registration lost, registering again", "instance", inst.String(), "err", err)
		// The lost publication is not withdrawn: its entry may still be
		// valid on the server (a lease the client gave up on but the server
		// kept), and deleting it would make the instance flap. The next
		// publication replaces it.
		if !g.republish(streak, err) {
			return
		}
		streak++
		since = time.Now()
	}
}

// refusal reports whether err is a refusal (permission, conflict, an
// instance the backend cannot store) rather than an outage: those are
// retried at the slowest backoff.
func refusal(err error) bool {
	return errors.Is(err, ErrPermission) || errors.Is(err, ErrConflict) || errors.Is(err, ErrInvalidInstance)
}

// republish publishes the instance until it succeeds or the registration
// ends. attempt is where the backoff starts; lossErr is why it was lost.
func (g *Registration) republish(attempt int, lossErr error) bool {
	cause := lossErr
	for ; ; attempt++ {
		d := g.r.opts.Backoff.Delay(attempt)
		if refusal(lossErr) {
			d = g.r.opts.Backoff.Delay(maxAttempt)
		}
		if !sleepCtx(g.ctx, d) {
			return false
		}
		g.opMu.Lock() // no Update or Deregister in between
		g.mu.Lock()
		inst := g.inst
		g.mu.Unlock()
		c := g.r.begin(g.ctx, "publish")
		pub, err := g.r.b.Publish(c.ctx, driver.Instance(inst))
		err = c.end(err)
		if err != nil {
			g.opMu.Unlock()
			if g.ctx.Err() != nil {
				return false
			}
			lossErr = err
			g.setStatus(Retrying, err)
			g.r.log.Warn("registry: re-registration failed", "instance", inst.String(), "attempt", attempt+1, "err", err)
			continue
		}
		g.mu.Lock()
		g.pub, g.lost = pub, nil
		g.transitionLocked(Registered)
		g.status.Err = nil
		g.status.Reregistrations++
		g.mu.Unlock()
		g.opMu.Unlock()
		g.r.met.reregistration(cause)
		g.r.log.Info("registry: registered again", "instance", inst.String(), "attempts", attempt+1)
		return true
	}
}

// Update replaces the registered instance's address and metadata. inst must
// have the same Service and ID (an empty ID means the current one). While the
// registration is being re-registered, the new value is stored and published
// by the next attempt. The backend call is bounded by ctx and by the
// Registry's CallTimeout, and Deregister or Close cut it short.
func (g *Registration) Update(ctx context.Context, inst Instance) error {
	g.opMu.Lock()
	defer g.opMu.Unlock()
	g.mu.Lock()
	cur, pub, closed := g.inst, g.pub, g.closed
	g.mu.Unlock()
	if closed {
		return opErr("update", cur.Service, ErrClosed)
	}
	if inst.ID == "" {
		inst.ID = cur.ID
	}
	if inst.Service != cur.Service || inst.ID != cur.ID {
		return opErr("update", cur.Service, invalid("update must keep service %q and ID %q", cur.Service, cur.ID))
	}
	inst, err := g.r.normalize(inst)
	if err != nil {
		return opErr("update", cur.Service, err)
	}
	if pub != nil {
		c := g.r.begin(ctx, "update")
		stop := context.AfterFunc(g.ctx, c.cancel)
		err := pub.Update(c.ctx, driver.Instance(inst))
		stop()
		err = c.end(err)
		if err != nil {
			if g.ctx.Err() != nil && ctx.Err() == nil {
				err = ErrClosed
			}
			return opErr("update", cur.Service, err)
		}
	}
	g.mu.Lock()
	g.inst = inst
	g.mu.Unlock()
	return nil
}

// Deregister stops the supervisor and withdraws the instance from the
// registry at once. If the withdrawal fails (the registry is unreachable),
// Deregister returns the error and the withdrawal goes on in the background,
// retried with backoff until it succeeds or the Registry closes; Status
// says Withdrawing meanwhile. ctx bounds only how long Deregister waits:
// even a canceled ctx starts the withdrawal. Later calls wait for the same
// withdrawal; they return nil once it has succeeded.
func (g *Registration) Deregister(ctx context.Context) error {
	g.mu.Lock()
	if !g.closed {
		g.closed = true
		g.withdrawn = make(chan struct{})
		g.mu.Unlock()
		g.cancel() // stops the supervisor, also in the middle of a re-registration
		<-g.done
		g.opMu.Lock() // wait for an Update in flight (cut short by cancel)
		g.mu.Lock()
		pub := g.pub
		if pub == nil {
			// Lost and not yet published again: withdraw what may remain of it.
			pub = g.lost
		}
		g.pub, g.lost = nil, nil
		g.mu.Unlock()
		g.opMu.Unlock()
		if pub == nil {
			g.finishWithdraw(nil)
		} else {
			g.setStatus(Withdrawing, nil)
			g.r.wg.Add(1)
			go g.withdraw(pub)
		}
		g.mu.Lock()
	}
	done := g.withdrawn
	service := g.inst.Service
	g.mu.Unlock()
	select {
	case <-done:
		g.mu.Lock()
		err := g.withdrawErr
		g.mu.Unlock()
		return opErr("deregister", service, err)
	case <-ctx.Done():
		err := ctx.Err()
		if st := g.Status(); st.Err != nil {
			err = fmt.Errorf("%w (withdrawal goes on in the background; last attempt: %w)", err, st.Err)
		} else {
			err = fmt.Errorf("%w (withdrawal goes on in the background)", err)
		}
		return opErr("deregister", service, err)
	}
}

// withdraw withdraws pub until it succeeds or the registry closes.
func (g *Registration) withdraw(pub driver.Publication) {
	defer g.r.wg.Done()
	inst := g.Instance()
	for attempt := 0; ; attempt++ {
		c := g.r.begin(g.r.ctx, "withdraw")
		err := c.end(pub.Withdraw(c.ctx))
		if err == nil {
			g.finishWithdraw(nil)
			g.r.log.Debug("registry: deregistered", "instance", inst.String(), "attempts", attempt+1)
			return
		}
		if g.r.ctx.Err() != nil {
			g.finishWithdraw(fmt.Errorf("%w before the instance could be withdrawn (last attempt: %w)", ErrClosed, err))
			return
		}
		g.setStatus(Withdrawing, err)
		g.r.met.withdrawFailure(err)
		g.r.log.Warn("registry: deregistration failed; retrying", "instance", inst.String(), "attempt", attempt+1, "err", err)
		d := g.r.opts.Backoff.Delay(attempt)
		if refusal(err) {
			d = g.r.opts.Backoff.Delay(maxAttempt)
		}
		if !sleepCtx(g.r.ctx, d) {
			g.finishWithdraw(fmt.Errorf("%w before the instance could be withdrawn (last attempt: %w)", ErrClosed, err))
			return
		}
	}
}

func (g *Registration) finishWithdraw(err error) {
	g.r.forget(g)
	g.mu.Lock()
	g.withdrawErr = err
	g.transitionLocked(Deregistered)
	g.status.Err = err
	close(g.withdrawn)
	g.mu.Unlock()
}
