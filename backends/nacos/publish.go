package nacos

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// svcState is what a backend registers in one service. Nacos keeps one
// publication per service and connection, so the service's instances are
// always sent together.
type svcState struct {
	name    string
	sub     *subscription // shows what the server has; held while the state lives
	sendSem chan struct{} // holds one token while an SDK register call of this service runs

	// Guarded by backend.mu.
	users     int                        // operations in progress
	desired   map[string]driver.Instance // what should be registered, lost publications included
	pubs      map[string]*publication
	sent      map[string]driver.Instance // what the connection holds, as last sent (= the SDK's redo cache)
	sentValid bool                       // false after a failed send: the server's state is unknown
	dirty     bool                       // desired may differ from what the server has
	retryAt   time.Time
	forcedAt  time.Time // when a resend of an unchanged set (sync's force) last went out
}

// useState returns the state of service, creating it, and counts a user.
func (b *backend) useState(service string) *svcState {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.svcs[service]
	if st == nil {
		st = &svcState{name: service, sub: b.acquireSubLocked(service), sendSem: make(chan struct{}, 1), desired: map[string]driver.Instance{},
			pubs: map[string]*publication{}, sent: map[string]driver.Instance{}, sentValid: true}
		b.svcs[service] = st
	}
	st.users++
	return st
}

// doneState ends a use of st.
func (b *backend) doneState(st *svcState) {
	b.mu.Lock()
	st.users--
	b.mu.Unlock()
	b.maybeDrop(st)
}

// maybeDrop forgets st once it holds nothing.
func (b *backend) maybeDrop(st *svcState) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if st.users > 0 || len(st.desired) > 0 || len(st.pubs) > 0 || len(st.sent) > 0 || !st.sentValid || st.dirty {
		return
	}
	if b.svcs[st.name] == st {
		delete(b.svcs, st.name)
		b.releaseSubLocked(st.sub)
	}
}

func sameInstance(a, b driver.Instance) bool {
	return a.Addr == b.Addr && maps.Equal(a.Metadata, b.Metadata)
}

func sameSet(a, b map[string]driver.Instance) bool {
	return maps.EqualFunc(a, b, sameInstance)
}

// sync sends st's desired instances unless the connection already holds
// them (or always, with force: at most once per redoGrace, however many
// callers wait for the server to show what was sent). Concurrent callers
// are merged: whoever holds sendSem sends everything desired at that time.
//
// It returns when ctx is done, whatever the SDK is doing: the SDK's calls
// take no context (they are bounded by its own request timeout), so the
// call runs on a goroutine of its own, which records its outcome and
// releases sendSem when the SDK returns.
func (b *backend) sync(ctx context.Context, cli naming_client.INamingClient, st *svcState, force bool) error {
	select {
	case st.sendSem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.mu.Lock()
	want := maps.Clone(st.desired)
	same := st.sentValid && sameSet(want, st.sent)
	prev := maps.Clone(st.sent)
	if same && force {
		if time.Since(st.forcedAt) < redoGrace {
			force = false // another waiter resent this very set just now
		} else {
			st.forcedAt = time.Now()
		}
	}
	b.mu.Unlock()
	if same && !force {
		<-st.sendSem
		return nil
	}
	if err := ctx.Err(); err != nil {
		<-st.sendSem
		return err
	}
	done := make(chan error, 1)
	b.sends.Add(1)
	go func() {
		defer b.sends.Done()
		err := b.send(cli, st.name, want, prev)
		b.mu.Lock()
		if err != nil {
			st.sentValid, st.dirty, st.retryAt = false, true, time.Now().Add(time.Second)
		} else {
			st.sent, st.sentValid = want, true
			st.dirty = !sameSet(st.desired, want)
		}
		b.mu.Unlock()
		<-st.sendSem
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// send registers exactly want in service for this connection: a deregister
// when it is empty, a register for one instance, a batch register for more.
func (b *backend) send(cli naming_client.INamingClient, service string, want, prev map[string]driver.Instance) error {
	var ok bool
	var err error
	var op string
	switch len(want) {
	case 0:
		op = "deregister"
		p := vo.DeregisterInstanceParam{ServiceName: service, GroupName: b.group, Cluster: b.cluster, Ephemeral: true, Ip: "0.0.0.0", Port: 1}
		for _, in := range prev { // the server drops the connection's whole publication whatever ip/port
			p.Ip, p.Port, _ = splitAddr(in.Addr)
			break
		}
		ok, err = cli.DeregisterInstance(p)
	case 1:
		op = "register"
		for _, in := range want {
			var p vo.RegisterInstanceParam
			if p, err = b.param(in); err == nil {
				ok, err = cli.RegisterInstance(p)
			}
		}
	default:
		op = "batch register"
		p := vo.BatchRegisterInstanceParam{ServiceName: service, GroupName: b.group}
		for _, id := range slices.Sorted(maps.Keys(want)) {
			ip, err := b.param(want[id])
			if err != nil {
				return err
			}
			p.Instances = append(p.Instances, ip)
		}
		ok, err = cli.BatchRegisterInstance(p)
	}
	if err != nil {
		return fmt.Errorf("%w: nacos: %s in %s: %w", sdkErrKind(err), op, service, err)
	}
	if !ok {
		return fmt.Errorf("nacos: %s in %s: the server refused it", op, service)
	}
	return nil
}

func splitAddr(addr string) (string, uint64, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	return host, p, err
}

// Nacos' "preserved" heart-beat metadata keys, which its server checks
// (NamingUtils.checkInstanceIsLegal).
const (
	metaHeartBeatInterval = "preserved.heart.beat.interval"
	metaHeartBeatTimeout  = "preserved.heart.beat.timeout"
	metaIPDeleteTimeout   = "preserved.ip.delete.timeout"
)

// checkMetadata refuses what the Nacos server would refuse (an error answer
// also makes the SDK check its connection and replay everything).
func checkMetadata(in driver.Instance) error {
	millis := func(key string, def int64) (int64, error) {
		v := in.Metadata[key]
		if v == "" {
			return def, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: nacos: metadata %q=%q is not a number of milliseconds", registry.ErrInvalidInstance, key, v)
		}
		return n, nil
	}
	interval, err := millis(metaHeartBeatInterval, 5000)
	if err != nil {
		return err
	}
	timeout, err := millis(metaHeartBeatTimeout, 15000)
	if err != nil {
		return err
	}
	ipDelete, err := millis(metaIPDeleteTimeout, 30000)
	if err != nil {
		return err
	}
	if timeout < interval || ipDelete < interval {
		return fmt.Errorf("%w: nacos: metadata %s must not exceed %s nor %s", registry.ErrInvalidInstance,
			metaHeartBeatInterval, metaHeartBeatTimeout, metaIPDeleteTimeout)
	}
	return nil
}

// param is the Nacos form of a rollcall instance: see the package doc.
func (b *backend) param(in driver.Instance) (vo.RegisterInstanceParam, error) {
	ip, port, err := splitAddr(in.Addr)
	if err != nil {
		return vo.RegisterInstanceParam{}, fmt.Errorf("nacos: address %q: %w", in.Addr, err)
	}
	md := make(map[string]string, len(in.Metadata)+1)
	maps.Copy(md, in.Metadata)
	md[MetaID] = in.ID
	weight := 1.0
	if w, err := strconv.Atoi(in.Metadata[registry.MetaWeight]); err == nil && w > 0 {
		weight = float64(w)
	}
	return vo.RegisterInstanceParam{Ip: ip, Port: port, Weight: weight, Enable: true, Healthy: true, Metadata: md,
		ClusterName: b.cluster, ServiceName: in.Service, GroupName: b.group, Ephemeral: true}, nil
}

// publication is one published instance.
type publication struct {
	driver.Loss
	b    *backend
	st   *svcState
	id   string
	inst driver.Instance // guarded by backend.mu
	// withdrawing: Withdraw took it out of what is registered and has not
	// yet seen it gone. Guarded by backend.mu.
	withdrawing bool

	mu      sync.Mutex
	visible bool // the server showed it; from then on its absence loses it
}

func (p *publication) setVisible() {
	p.mu.Lock()
	p.visible = true
	p.mu.Unlock()
}

func (p *publication) isVisible() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.visible
}

// Publish publishes inst. A publication of the same ID that was lost keeps
// its instance registered (the SDK's redo may have restored it) until this
// one replaces it.
func (b *backend) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	if err := checkMetadata(inst); err != nil {
		return nil, err
	}
	cli, err := b.client(ctx)
	if err != nil {
		return nil, err
	}
	st := b.useState(inst.Service)
	defer b.doneState(st)
	if err := st.sub.subscribe(ctx, cli); err != nil {
		return nil, err
	}
	if err := b.conflict(ctx, st, inst); err != nil {
		return nil, err
	}
	p := &publication{b: b, st: st, id: inst.ID, inst: inst}
	b.mu.Lock()
	old := st.pubs[inst.ID]
	st.pubs[inst.ID] = p
	st.desired[inst.ID] = inst
	held, ok := st.sent[inst.ID]
	already := ok && st.sentValid && sameInstance(held, inst)
	b.mu.Unlock()
	if already {
		// This connection sent it already (before the loss, or the SDK's
		// redo did after a reconnect): if the server shows it, there is
		// nothing to send.
		if st.sub.waitFor(ctx, redoGrace, "instance "+inst.ID, shown(inst, held)) == nil {
			return b.published(p, old), nil
		}
	}
	err = b.sync(ctx, cli, st, already)
	if err == nil {
		err = b.settle(ctx, cli, st, "instance "+inst.ID, shown(inst, held))
	}
	if err == nil {
		// A registration of the ID at another address that raced with
		// this one (each past the other's check): this one yields.
		err = b.conflict(ctx, st, inst)
	}
	if err != nil {
		b.publishFailed(st, p, old)
		return nil, err
	}
	return b.published(p, old), nil
}

// conflict returns an error wrapping registry.ErrConflict when the
// server's list of the service shows inst's ID at an address other than
// inst's and other than what this connection sent for it: another client
// (another process, or another Registry) holds the ID. Nacos itself names
// an instance by service, cluster, ip and port, and keeps rollcall's ID in
// metadata only, so the ID's owner is whoever registered it at the address
// the list shows; the same address is the same Nacos instance, and is
// accepted.
//
// The list trails the server by a push (and Nacos answers a query from the
// same cache its pushes are made of, so asking it would not tell more): a
// holder that has just left may still be in it. So a holder is taken as one
// only if it is still in the list after pushWindow.
func (b *backend) conflict(ctx context.Context, st *svcState, inst driver.Instance) error {
	b.mu.Lock()
	mine := st.sent[inst.ID].Addr
	b.mu.Unlock()
	other := func() string {
		for _, addr := range st.sub.holders(inst.ID) {
			if addr != inst.Addr && addr != mine {
				return addr
			}
		}
		return ""
	}
	addr := other()
	if addr == "" {
		return nil
	}
	err := st.sub.waitFor(ctx, pushWindow, "the departure of the holder at "+addr, func(map[string]driver.Instance) bool {
		addr = other()
		return addr == ""
	})
	if err == nil || ctx.Err() != nil || errors.Is(err, errClosed) {
		return err
	}
	return fmt.Errorf("%w: nacos: %s/%s is registered at %s by another client", registry.ErrConflict, inst.Service, inst.ID, addr)
}

// settle waits until the server's list of st's service satisfies cond. If it
// does not within redoGrace, it sends st's instances once more and waits on:
// a replay of the SDK's (its redo, on each new connection, re-sends what it
// read from its cache, possibly just before a newer request of ours went out)
// can have undone what was sent.
func (b *backend) settle(ctx context.Context, cli naming_client.INamingClient, st *svcState, what string, cond func(map[string]driver.Instance) bool) error {
	if err := st.sub.waitFor(ctx, redoGrace, what, cond); err == nil || ctx.Err() != nil {
		return err
	}
	b.log.Debug("nacos: the server does not show what was sent; sending it again", "service", st.name, "waiting for", what)
	if err := b.sync(ctx, cli, st, true); err != nil {
		return err
	}
	return st.sub.waitFor(ctx, 0, what, cond)
}

// settleRemoval is settle for a withdrawal: it waits until the server's
// list no longer shows id. Another client may register the same ID at the
// same address (the same Nacos instance, see conflict), and then the list
// keeps showing it: so after redoGrace the withdrawal is sent once more
// (as settle does, for a redo that undid it), and the server's success
// answer to that send ends it (a deregistration removes the connection's
// whole publication of the service, and a redo cannot come after it
// without a new connection, whose loss the backend reports).
func (b *backend) settleRemoval(ctx context.Context, cli naming_client.INamingClient, st *svcState, id string) error {
	if err := st.sub.waitFor(ctx, redoGrace, "the removal of "+id, gone(id)); err == nil || ctx.Err() != nil {
		return err
	}
	return b.sync(ctx, cli, st, true)
}

// shown reports whether the server shows inst as rollcall sent it: its
// address and every metadata key it sent, and none of the keys that prev
// (what was sent of it before, if anything) had and inst drops. Keys the
// server adds itself (Polaris' Nacos plugin adds internal-nacos-*) are not
// rollcall's to wait for.
func shown(inst, prev driver.Instance) func(map[string]driver.Instance) bool {
	return func(m map[string]driver.Instance) bool {
		cur, ok := m[inst.ID]
		if !ok || cur.Addr != inst.Addr {
			return false
		}
		for k, v := range inst.Metadata {
			if got, ok := cur.Metadata[k]; !ok || got != v {
				return false
			}
		}
		for k := range prev.Metadata {
			if _, kept := inst.Metadata[k]; !kept {
				if _, ok := cur.Metadata[k]; ok {
					return false
				}
			}
		}
		return true
	}
}

func gone(id string) func(map[string]driver.Instance) bool {
	return func(m map[string]driver.Instance) bool {
		_, ok := m[id]
		return !ok
	}
}

// published ends a successful Publish: p is visible and replaces old.
func (b *backend) published(p, old *publication) *publication {
	p.setVisible()
	if old != nil {
		old.Lose(errReplaced)
	}
	return p
}

// publishFailed undoes a Publish whose instance did not become visible: a
// publication it was replacing (lost, whose registration is being retried)
// is back in place, with its instance; anything else is withdrawn by the
// maintenance loop.
func (b *backend) publishFailed(st *svcState, p, old *publication) {
	b.mu.Lock()
	if st.pubs[p.id] == p {
		if old != nil {
			st.pubs[p.id] = old
			st.desired[p.id] = old.inst
		} else {
			delete(st.pubs, p.id)
			delete(st.desired, p.id)
		}
		st.dirty = true
	}
	b.mu.Unlock()
	p.Lose(errWithdrawn)
}

func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	if err := checkMetadata(inst); err != nil {
		return err
	}
	b, st := p.b, p.st
	cli, err := b.client(ctx)
	if err != nil {
		return err
	}
	b.mu.Lock()
	if st.pubs[p.id] != p {
		b.mu.Unlock()
		return errors.New("nacos: update of a withdrawn or replaced registration")
	}
	prev := st.desired[p.id]
	st.desired[p.id], p.inst = inst, inst
	b.mu.Unlock()
	err = b.sync(ctx, cli, st, false)
	if err == nil {
		err = b.settle(ctx, cli, st, "instance "+inst.ID, shown(inst, prev))
	}
	if err != nil {
		b.mu.Lock()
		if st.pubs[p.id] == p {
			st.desired[p.id], p.inst = prev, prev
			st.dirty = true
		}
		b.mu.Unlock()
	}
	return err
}

// Withdraw removes the instance at once, also when the publication was lost
// (the SDK's redo may have registered it again). It may be called again
// after it failed: it then sends again what is left to send and returns nil
// once the server's list no longer shows the instance (or another
// publication of the same ID holds it).
func (p *publication) Withdraw(ctx context.Context) error {
	b, st := p.b, p.st
	b.mu.Lock()
	mine := st.pubs[p.id] == p
	if mine {
		delete(st.pubs, p.id)
		delete(st.desired, p.id)
		p.withdrawing = true
	}
	pending := p.withdrawing && st.pubs[p.id] == nil
	st.users++
	b.mu.Unlock()
	defer b.doneState(st)
	p.Lose(errWithdrawn)
	if !pending {
		return nil // replaced by a newer publication of the ID, or already gone
	}
	cli, err := b.client(ctx)
	if err != nil {
		return err
	}
	if err := b.sync(ctx, cli, st, false); err != nil {
		return err
	}
	if err := b.settleRemoval(ctx, cli, st, p.id); err != nil {
		return err
	}
	b.mu.Lock()
	p.withdrawing = false
	b.mu.Unlock()
	return nil
}

// checkAbsence loses the visible publications of service that a new list
// from the server lacks.
func (b *backend) checkAbsence(service string, snap map[string]driver.Instance) {
	var lost []*publication
	b.mu.Lock()
	if st := b.svcs[service]; st != nil {
		for id, p := range st.pubs {
			if _, ok := snap[id]; !ok && p.isVisible() {
				lost = append(lost, p)
			}
		}
	}
	b.mu.Unlock()
	for _, p := range lost {
		p.Lose(errGone)
	}
}
