package registry

import (
	"context"
	"sync"
	"time"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Registration is a registered instance kept alive by a supervisor: after the
// lease or session is lost, the registry restarts or wipes its data, or
// someone deletes the entry, it registers the instance again, retrying with
// capped, jittered backoff for as long as the Registration lives. It is safe
// for concurrent use.
type Registration struct {
	r      *registry
	ctx    context.Context // canceled by Deregister and registry Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the supervisor has exited

	opMu sync.Mutex // serialises Update and Deregister

	mu     sync.Mutex
	inst   Instance
	pub    driver.Publication // nil while lost
	lost   driver.Publication // the lost publication, until replaced
	status Status
	closed bool
}

// State is the state of a Registration.
type State int

const (
	// Registered: the instance is published.
	Registered State = iota
	// Retrying: the publication was lost and the supervisor is registering
	// the instance again.
	Retrying
	// Deregistered: Deregister was called or the registry closed.
	Deregistered
)

func (s State) String() string {
	switch s {
	case Registered:
		return "registered"
	case Retrying:
		return "retrying"
	case Deregistered:
		return "deregistered"
	}
	return "unknown"
}

// Status reports a Registration's state.
type Status struct {
	State State
	// Err is why the last publication was lost, or the last failed attempt
	// to publish again; nil while Registered.
	Err error
	// Since is when State last changed.
	Since time.Time
	// Reregistrations counts successful re-registrations.
	Reregistrations int
}

func newRegistration(r *registry, inst Instance, pub driver.Publication) *Registration {
	ctx, cancel := context.WithCancel(r.ctx)
	return &Registration{r: r, ctx: ctx, cancel: cancel, done: make(chan struct{}), inst: inst, pub: pub,
		status: Status{State: Registered, Since: time.Now()}}
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
	if g.status.State != s {
		g.status.Since = time.Now()
	}
	g.status.State, g.status.Err = s, err
}

// supervise waits for the publication to be lost and publishes again.
func (g *Registration) supervise() {
	defer g.r.wg.Done()
	defer close(g.done)
	log := g.r.log
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
		if !g.republish() {
			return
		}
	}
}

// republish publishes the instance until it succeeds or the registration ends.
func (g *Registration) republish() bool {
	for attempt := 0; ; attempt++ {
		if !sleepCtx(g.ctx, g.r.opts.Backoff.Delay(attempt)) {
			return false
		}
		g.opMu.Lock() // no Update or Deregister in between
		g.mu.Lock()
		inst := g.inst
		g.mu.Unlock()
		ctx, cancel := context.WithTimeout(g.ctx, g.r.opts.CallTimeout)
		pub, err := g.r.b.Publish(ctx, driver.Instance(inst))
		cancel()
		if err != nil {
			g.opMu.Unlock()
			if g.ctx.Err() != nil {
				return false
			}
			g.setStatus(Retrying, err)
			g.r.log.Warn("registry: re-registration failed", "instance", inst.String(), "attempt", attempt+1, "err", err)
			continue
		}
		g.mu.Lock()
		g.pub, g.lost = pub, nil
		g.status = Status{State: Registered, Since: time.Now(), Reregistrations: g.status.Reregistrations + 1}
		g.mu.Unlock()
		g.opMu.Unlock()
		g.r.log.Info("registry: registered again", "instance", inst.String(), "attempts", attempt+1)
		return true
	}
}

// Update replaces the registered instance's address and metadata. inst must
// have the same Service and ID (an empty ID means the current one). While the
// registration is being re-registered, the new value is stored and published
// by the next attempt.
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
	inst, err := normalize(inst)
	if err != nil {
		return opErr("update", cur.Service, err)
	}
	if pub != nil {
		if err := pub.Update(ctx, driver.Instance(inst)); err != nil {
			return opErr("update", cur.Service, err)
		}
	}
	g.mu.Lock()
	g.inst = inst
	g.mu.Unlock()
	return nil
}

// Deregister stops the supervisor and withdraws the instance from the
// registry at once. It is idempotent: later calls return nil.
func (g *Registration) Deregister(ctx context.Context) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	g.mu.Unlock()
	g.cancel() // stops the supervisor, also in the middle of a re-registration
	<-g.done
	g.opMu.Lock() // wait for an Update in flight
	defer g.opMu.Unlock()
	g.r.forget(g)
	g.mu.Lock()
	pub, inst := g.pub, g.inst
	if pub == nil {
		// Lost and not yet published again: withdraw what may remain of it.
		pub = g.lost
	}
	g.pub, g.lost = nil, nil
	g.mu.Unlock()
	g.setStatus(Deregistered, nil)
	if pub == nil {
		return nil
	}
	return opErr("deregister", inst.Service, pub.Withdraw(ctx))
}
