package etcd

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Reasons a publication is lost.
var (
	ErrLeaseLost = errors.New("etcd: lease expired or revoked")
	ErrKeyGone   = errors.New("etcd: key deleted or overwritten by someone else")
)

var (
	errWithdrawn       = errors.New("etcd: withdrawn")
	errNoRegistrations = errors.New("etcd: no registrations left")
)

// session is the backend's lease and the loops that keep and guard it.
// Its mutable fields are guarded by b.mu.
//
// A session whose keepalive got no answer within the TTL is unrenewed: its
// publications are lost (the registrations say so and publish again), but
// the lease may well be alive (etcd extends every lease when it restarts, a
// frozen server expires nothing), so the session keeps trying to renew it
// and is handed out again once it did. It is dead (Lost) only when the
// server says the lease is gone, or when it is retired.
type session struct {
	driver.Loss
	id     clientv3.LeaseID
	ctx    context.Context // the keepalive's and the guards' (on a gRPC stream of their own); ends with the session
	cancel context.CancelFunc
	n      int             // publications in b.pubs using this session
	guards map[string]bool // service directories guarded
	retire bool            // no publication left: being revoked, never handed out again
	stale  bool            // unrenewed: the keepalive got no answer within the TTL
	term   uint64          // the raft term the lease was granted in
	moving bool            // its publications are being moved to a lease of a later term
}

// session returns the live session, granting a lease and starting its
// keepalive if there is none.
func (b *backend) session(ctx context.Context) (*session, error) {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	b.mu.Lock()
	cur := b.sess
	stale := cur != nil && cur.stale
	b.mu.Unlock()
	if cur != nil && !cur.IsLost() {
		if !stale {
			return cur, nil
		}
		// Renew the lease before granting another: if it is alive, the
		// instances it holds never went away.
		err := b.renew(ctx, cur)
		if err == nil {
			return cur, nil
		}
		if !isLeaseNotFound(err) {
			return nil, err
		}
		b.loseSession(cur, ErrLeaseLost)
	}
	ss, err := b.grant(ctx)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.sess = ss
	b.mu.Unlock()
	return ss, nil
}

// grant grants a lease and starts its keepalive; b.sessMu is held.
func (b *backend) grant(ctx context.Context) (*session, error) {
	if b.ctx.Err() != nil {
		return nil, errors.New("etcd: backend closed")
	}
	if err := b.connect(ctx); err != nil {
		return nil, err
	}
	secs := int64((b.opts.TTL + time.Second - 1) / time.Second)
	grant, err := b.cli.Grant(retried(clientv3.WithRequireLeader(ctx)), secs)
	if err != nil {
		return nil, err
	}
	if granted := time.Duration(grant.TTL) * time.Second; granted != b.opts.TTL && b.ttlLogged.CompareAndSwap(false, true) {
		b.log.Info("etcd: the server granted another lease TTL than the one asked for (whole seconds, at least its minimum TTL)",
			"asked", b.opts.TTL, "granted", granted)
	}
	sctx, cancel := context.WithCancel(clientv3.WithRequireLeader(b.withStream(b.ctx, fmt.Sprintf("lease-%x", grant.ID))))
	ka, err := b.cli.KeepAlive(sctx, grant.ID)
	if err != nil {
		cancel()
		return nil, err
	}
	ss := &session{id: grant.ID, ctx: sctx, cancel: cancel, guards: map[string]bool{}, term: grant.RaftTerm}
	b.mu.Lock()
	b.leases[grant.ID] = true
	b.mu.Unlock()
	b.wg.Add(1)
	go b.keepAlive(ss, ka)
	return ss, nil
}

// keepAlive drains clientv3's keepalive responses. The channel closes when
// the lease is gone or was not renewed within its TTL (clientv3 gives up
// then, without saying which): keepAlive asks the server by renewing it
// (short tries for about a second). Gone: the session is dead. No answer:
// the session is unrenewed (its publications are lost) and keeps renewing
// until the server answers. Renewed: clientv3 keeps it alive again.
//
// clientv3 sends its keepalives on one gRPC stream, to one member, and
// notices nothing while that member is frozen: the stream stays open
// (until gRPC's keepalive closes the connection, about 13s) and the
// channel closes only when the TTL has run out, by when the lease is
// expiring on the leader. So while the stream is silent for longer than a
// renewal period, keepAlive renews the lease itself, through a new stream
// per try (the balancer sends each to the next member): a frozen member of
// a cluster with quorum never costs the registrations.
func (b *backend) keepAlive(ss *session, ka <-chan *clientv3.LeaseKeepAliveResponse) {
	defer b.wg.Done()
	for {
		b.drain(ss, ka)
		if ss.ctx.Err() != nil {
			return
		}
		err := b.renewTries(ss, time.Second)
		if err != nil && !isLeaseNotFound(err) {
			b.unrenewed(ss)
			for err != nil && !isLeaseNotFound(err) && ss.ctx.Err() == nil {
				// renew waits for a connection; an error that came at once
				// is tried again shortly.
				t := time.NewTimer(200 * time.Millisecond)
				select {
				case <-ss.ctx.Done():
				case <-t.C:
				}
				t.Stop()
				err = b.renew(ss.ctx, ss)
			}
		}
		if ss.ctx.Err() != nil {
			return
		}
		if err != nil { // the lease is gone
			b.loseSession(ss, ErrLeaseLost)
			return
		}
		if ka, err = b.cli.KeepAlive(ss.ctx, ss.id); err != nil {
			if ss.ctx.Err() == nil {
				b.loseSession(ss, fmt.Errorf("%w: %w", ErrLeaseLost, err))
			}
			return
		}
	}
}

// drain reads ka until it closes or the session ends, renewing ss through
// new streams while ka is silent for longer than clientv3's renewal period
// (a third of the TTL, sent on a 500ms tick) and a margin, and until the
// server says the lease is gone.
func (b *backend) drain(ss *session, ka <-chan *clientv3.LeaseKeepAliveResponse) {
	ttl := b.opts.TTL
	silent := ttl/3 + 600*time.Millisecond
	tick := time.NewTicker(min(ttl/12, 250*time.Millisecond))
	defer tick.Stop()
	heard, renewed := time.Now(), time.Now()
	logged := false
	for {
		select {
		case resp, ok := <-ka:
			if !ok {
				return
			}
			b.sawTerm(resp.RaftTerm)
			heard, renewed = time.Now(), time.Now()
			logged = false
		case <-ss.ctx.Done():
			return
		case <-tick.C:
			if time.Since(heard) < silent || time.Since(renewed) < silent {
				continue
			}
			try := max(ttl/10, 200*time.Millisecond)
			ctx, cancel := context.WithTimeout(ss.ctx, try)
			resp, err := b.cli.KeepAliveOnce(ctx, ss.id)
			cancel()
			switch {
			case err == nil:
				b.sawTerm(resp.RaftTerm)
				renewed = time.Now()
				if !logged {
					logged = true
					b.log.Info("etcd: the lease's keepalive stream went silent; renewed the lease through another stream",
						"lease", fmt.Sprintf("%x", int64(ss.id)), "silent", time.Since(heard).Round(time.Millisecond))
				}
			case isLeaseNotFound(err):
				return
			}
		}
	}
}

// renewTries renews ss for at most budget, each try on a new stream: the
// first may take a tenth of the TTL (200ms at least), each later one twice
// the one before (a loaded server answers late; a frozen one never).
func (b *backend) renewTries(ss *session, budget time.Duration) error {
	ctx, cancel := context.WithTimeout(ss.ctx, budget)
	defer cancel()
	try := max(b.opts.TTL/10, 200*time.Millisecond)
	for ; ; try *= 2 {
		tctx, tcancel := context.WithTimeout(ctx, try)
		err := b.renew(tctx, ss)
		tcancel()
		if err == nil || isLeaseNotFound(err) || ctx.Err() != nil {
			return err
		}
		if tctx.Err() == nil { // failed at once (no connection): not again at once
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}
}

// unrenewed marks ss stale and loses its publications: nobody knows
// whether the server still has them.
func (b *backend) unrenewed(ss *session) {
	b.mu.Lock()
	ss.stale = true
	var lost []*publication
	for _, p := range b.pubs {
		if p.sess == ss {
			lost = append(lost, p)
		}
	}
	b.mu.Unlock()
	err := fmt.Errorf("%w: not renewed within its TTL (%v); renewing it again", ErrLeaseLost, b.opts.TTL)
	for _, p := range lost {
		p.Lose(err)
	}
}

// renew renews ss's lease once, waiting for a connection for at most ctx
// and the TTL. On success ss is fresh again; an error wrapping
// rpctypes.ErrLeaseNotFound means the lease is gone.
func (b *backend) renew(ctx context.Context, ss *session) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.TTL)
	defer cancel()
	resp, err := b.cli.KeepAliveOnce(ctx, ss.id)
	if err != nil {
		return err
	}
	b.sawTerm(resp.RaftTerm)
	b.mu.Lock()
	was := ss.stale
	ss.stale = false
	b.mu.Unlock()
	if was {
		b.log.Info("etcd: lease renewed after going unrenewed for longer than its TTL", "lease", fmt.Sprintf("%x", int64(ss.id)))
	}
	return nil
}

// sawTerm notes a raft term a response carried. A term later than the
// one the live session's lease was granted in means the cluster elected a
// leader since, and the old one may come back: etcd renews leases on the
// leader only, so a leader that was frozen (or stuck on its disk) past the
// TTL finds the lease expired in its own view when it resumes, and it can
// revoke it through the new leader before it learns it lost the lead
// (etcd-io/etcd#15247; 3.6's ensureLeadership check passes as soon as a
// resumed process ticks again). So the session's publications move to a
// lease granted in the new term, which the old leader never saw expire,
// and the old lease is revoked: the instances stay registered throughout.
func (b *backend) sawTerm(term uint64) {
	b.mu.Lock()
	ss := b.sess
	if ss == nil || term <= ss.term || ss.moving || ss.retire || ss.stale || ss.n == 0 || ss.IsLost() || b.ctx.Err() != nil {
		b.mu.Unlock()
		return
	}
	ss.moving = true
	b.wg.Add(1)
	b.mu.Unlock()
	go b.rotate(ss, term)
}

// rotate grants a lease and moves old's publications to it: each key is
// rewritten in place (same value, new lease) if it is still as its
// publication last wrote it. A key changed meanwhile is lost and published
// again; old is revoked once none of its publications is left on it.
func (b *backend) rotate(old *session, term uint64) {
	defer b.wg.Done()
	ctx, cancel := context.WithTimeout(b.ctx, b.opts.TTL)
	defer cancel()
	b.sessMu.Lock()
	b.mu.Lock()
	current := b.sess == old && !old.retire && !old.stale && !old.IsLost()
	b.mu.Unlock()
	var ns *session
	var err error
	if current {
		ns, err = b.grant(ctx)
	}
	if err != nil {
		b.sessMu.Unlock()
		b.mu.Lock()
		old.moving = false // a later response tries again
		b.mu.Unlock()
		b.log.Warn("etcd: a leader was elected since the lease was granted; granting a lease in the new term failed", "err", err)
		return
	}
	if ns == nil {
		b.sessMu.Unlock()
		return
	}
	b.mu.Lock()
	b.sess = ns
	old.retire = true // never handed out again; revoked once empty
	// A publication being moved has rev 0, as one whose first put is in
	// flight: a deletion or foreign write its guards see meanwhile is kept
	// in goneAt, and the move decides once it knows its revision.
	var moving []move
	for _, p := range b.pubs {
		if p.sess == old && p.rev != 0 { // a put in flight stays on old
			p.sess = ns
			old.n--
			ns.n++
			moving = append(moving, move{p, p.rev})
			b.guardLocked(ns, p.service, p.rev)
			p.rev = 0
		}
	}
	empty := old.n == 0
	b.mu.Unlock()
	b.sessMu.Unlock()
	b.log.Info("etcd: a leader was elected since the lease was granted; moving the registrations to a lease of the new term",
		"lease", fmt.Sprintf("%x", int64(old.id)), "term", old.term, "new-lease", fmt.Sprintf("%x", int64(ns.id)), "new-term", term, "keys", len(moving))
	// The moves have a TTL of their own: old's keepalive keeps its keys
	// meanwhile.
	mctx, mcancel := context.WithTimeout(b.ctx, b.opts.TTL)
	defer mcancel()
	for _, m := range b.moveAll(mctx, moving, old, ns) {
		b.move(mctx, m.p, m.from, old, ns)
	}
	if !empty {
		return // a publication whose first put was in flight: Withdraw, or the publication replacing it, retires old
	}
	b.mu.Lock()
	empty = old.n == 0
	b.mu.Unlock()
	if empty {
		if err := b.retire(mctx, old); err != nil {
			b.log.Warn("etcd: revoking the lease whose registrations moved to a new one", "lease", fmt.Sprintf("%x", int64(old.id)), "err", err)
		}
	}
}

// A move is a publication rotate moves, from its put at revision from.
type move struct {
	p    *publication
	from int64
}

// maxMoves is how many keys moveAll moves in one transaction: etcd's
// default --max-txn-ops is 128.
const maxMoves = 128

// moveAll moves the keys of ms to ns's lease in as few transactions as it
// can, each applied only if every key in it is as its publication last
// wrote it, so that the keys are on the new lease one round trip after the
// rotation began. It returns the moves left for move, one by one: those of
// a transaction that failed or found a key changed.
func (b *backend) moveAll(ctx context.Context, ms []move, old, ns *session) (left []move) {
	for len(ms) > 0 {
		chunk := ms[:min(len(ms), maxMoves)]
		ms = ms[len(chunk):]
		cmps := make([]clientv3.Cmp, 0, 2*len(chunk))
		puts := make([]clientv3.Op, 0, len(chunk))
		for _, m := range chunk {
			if b.moveHook != nil {
				b.moveHook(m.p.key)
			}
			cmps = append(cmps, clientv3.Compare(clientv3.LeaseValue(m.p.key), "=", old.id), clientv3.Compare(clientv3.ModRevision(m.p.key), "=", m.from))
			puts = append(puts, clientv3.OpPut(m.p.key, "", clientv3.WithIgnoreValue(), clientv3.WithLease(ns.id)))
		}
		var resp *clientv3.TxnResponse
		err := b.tries(ctx, func(ctx context.Context) (err error) {
			resp, err = b.cli.Txn(ctx).If(cmps...).Then(puts...).Commit()
			return err
		})
		if err != nil || !resp.Succeeded {
			left = append(left, chunk...)
			continue
		}
		for _, m := range chunk {
			b.wrote(m.p, resp.Header.Revision)
		}
	}
	return left
}

// move rewrites p's key with ns's lease if it still carries old's lease at
// revision from (or at one an Update of p under old wrote since). A key
// deleted or overwritten meanwhile, or after the move (its guard sees it),
// makes p lost: its registration publishes again. A try that failed is
// made again until ctx ends; then p goes back on old, whose lease is then
// kept until p is withdrawn or replaced (the key is either still on old,
// or on ns, which old's guard takes as a loss).
func (b *backend) move(ctx context.Context, p *publication, from int64, old, ns *session) {
	changed := 0
	for {
		b.mu.Lock()
		cur := b.pubs[p.key] == p
		b.mu.Unlock()
		if !cur {
			return // withdrawn or replaced meanwhile; the guard sweeps a key left under ns
		}
		if b.moveHook != nil {
			b.moveHook(p.key)
		}
		var resp *clientv3.TxnResponse
		err := b.tries(ctx, func(ctx context.Context) (err error) {
			resp, err = b.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.LeaseValue(p.key), "=", old.id), clientv3.Compare(clientv3.ModRevision(p.key), "=", from)).
				Then(clientv3.OpPut(p.key, "", clientv3.WithIgnoreValue(), clientv3.WithLease(ns.id))).
				Else(clientv3.OpGet(p.key, clientv3.WithKeysOnly())).
				Commit()
			return err
		})
		if err != nil {
			b.unmove(p, from, old, ns, err)
			return
		}
		var at int64
		if resp.Succeeded {
			at = resp.Header.Revision
		} else {
			kvs := resp.Responses[0].GetResponseRange().GetKvs()
			var by clientv3.LeaseID
			if len(kvs) > 0 {
				by = clientv3.LeaseID(kvs[0].Lease)
			}
			switch {
			case by == old.id && changed < 3: // an Update of p under old since: move that
				changed++
				from = kvs[0].ModRevision
				continue
			case by == old.id:
				p.Lose(fmt.Errorf("etcd: %s changed under every attempt to move it to a new lease", p.key))
				return
			case by == ns.id: // written under ns since (by an Update of p)
				at = kvs[0].ModRevision
			default:
				b.mu.Lock()
				lossErr := b.lossLocked(p.key, by)
				b.mu.Unlock()
				p.Lose(lossErr)
				return
			}
		}
		b.wrote(p, at)
		return
	}
}

// wrote records that p's key was written (or moved) at revision rev, and
// loses p if a guard saw it deleted or overwritten after that.
func (b *backend) wrote(p *publication, rev int64) {
	b.mu.Lock()
	p.rev = max(p.rev, rev)
	var lossErr error
	if p.goneAt > p.rev {
		lossErr = b.lossLocked(p.key, p.goneBy)
	}
	b.mu.Unlock()
	if lossErr != nil {
		p.Lose(lossErr)
	}
}

// moveTry is how long one try of a move may take: moves race the old
// leader's revocation of the old lease, so a try sent to a frozen member is
// made again on the next one soon, not after doubling waits (shortTries).
const moveTry = time.Second

// tries calls f, a write that cannot apply twice, with a fresh moveTry
// deadline until it succeeds, the server says the lease is gone, or ctx
// ends. An error that came at once is not tried again at once.
func (b *backend) tries(ctx context.Context, f func(context.Context) error) error {
	for {
		tctx, cancel := context.WithTimeout(retried(clientv3.WithRequireLeader(ctx)), moveTry)
		err := f(tctx)
		late := tctx.Err() != nil
		cancel()
		if err == nil || isLeaseNotFound(err) || ctx.Err() != nil {
			return err
		}
		if !late {
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}
}

// unmove puts p, whose move to ns did not complete in time, back on old.
func (b *backend) unmove(p *publication, from int64, old, ns *session, err error) {
	b.mu.Lock()
	back := b.pubs[p.key] == p && p.sess == ns
	if back {
		p.sess = old
		ns.n--
		old.n++
	}
	b.mu.Unlock()
	if back {
		b.wrote(p, from)
	}
	b.log.Warn("etcd: moving a registration to the lease of the new term failed; it stays on its lease", "key", p.key, "lease", fmt.Sprintf("%x", int64(old.id)), "err", err)
}

// guardLocked starts watching service's directory for deletions and
// overwrites of ss's keys, from revision rev on, unless it is watched
// already. b.mu is held.
func (b *backend) guardLocked(ss *session, service string, rev int64) {
	if ss.guards[service] || ss.ctx.Err() != nil {
		return
	}
	ss.guards[service] = true
	b.wg.Add(1)
	go b.guard(ss, service, rev)
}

// guard watches one service directory for deletions of ss's keys and for
// writes of them by another lease, from revision rev on. The watch starts
// at a revision it has seen (never past the server's current revision,
// which etcd would not report progress for); events it sees again are
// harmless, since a loss counts only for a put older than it. After the
// watch fails it checks the keys it holds there, and watches again from the
// revision it checked at.
func (b *backend) guard(ss *session, service string, rev int64) {
	defer b.wg.Done()
	dir := b.dir(service)
	for attempt := 0; ss.ctx.Err() == nil; attempt++ {
		wch := b.cli.Watch(ss.ctx, dir, clientv3.WithPrefix(), clientv3.WithRev(rev))
		for resp := range wch {
			if err := resp.Err(); err != nil {
				break
			}
			attempt = 0
			for _, ev := range resp.Events {
				rev = max(rev, ev.Kv.ModRevision)
				if ev.Type == mvccpb.DELETE {
					b.keyGone(ss, string(ev.Kv.Key), ev.Kv.ModRevision, 0)
				} else if lease := clientv3.LeaseID(ev.Kv.Lease); lease != ss.id {
					b.keyGone(ss, string(ev.Kv.Key), ev.Kv.ModRevision, lease)
				} else {
					b.sweep(ss, ev.Kv)
				}
			}
		}
		if ss.ctx.Err() != nil || ss.IsLost() {
			return
		}
		// The watch ended (compaction, lost leader, no permission): check
		// every key held there.
		t := time.NewTimer(time.Duration(min(attempt+1, 10)) * 200 * time.Millisecond)
		select {
		case <-ss.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if r, err := b.verify(ss, service); err == nil {
			rev = r
		}
	}
}

// sweep deletes kv, written with ss's lease, if no publication holds its
// key: a write that was tried again on another member (shortTries) and
// that the first member, frozen meanwhile, applied when it thawed, after
// the key was withdrawn. The delete applies only to that very write. (A
// late write over a key a publication holds under another lease is that
// publication's guard's to judge.)
func (b *backend) sweep(ss *session, kv *mvccpb.KeyValue) {
	b.mu.Lock()
	p := b.pubs[string(kv.Key)]
	b.mu.Unlock()
	if p != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ss.ctx, b.opts.ProgressTimeout)
	defer cancel()
	resp, err := b.cli.Txn(retried(clientv3.WithRequireLeader(ctx))).
		If(clientv3.Compare(clientv3.ModRevision(string(kv.Key)), "=", kv.ModRevision), clientv3.Compare(clientv3.LeaseValue(string(kv.Key)), "=", ss.id)).
		Then(clientv3.OpDelete(string(kv.Key))).
		Commit()
	if err == nil && resp.Succeeded {
		b.log.Warn("etcd: deleted a key of this registry's lease that no registration holds (a write applied late)", "key", string(kv.Key), "revision", kv.ModRevision)
	}
}

// verify checks that every key of ss in service's directory still carries
// ss's lease and returns the revision it read at.
func (b *backend) verify(ss *session, service string) (int64, error) {
	ctx, cancel := context.WithTimeout(ss.ctx, b.opts.ProgressTimeout)
	defer cancel()
	dir := b.dir(service)
	resp, err := b.cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, err
	}
	held := make(map[string]clientv3.LeaseID, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		held[string(kv.Key)] = clientv3.LeaseID(kv.Lease)
	}
	b.mu.Lock()
	var keys []string
	for k, p := range b.pubs {
		if p.sess == ss && p.service == service {
			keys = append(keys, k)
		}
	}
	b.mu.Unlock()
	for _, k := range keys {
		if lease, ok := held[k]; !ok || lease != ss.id {
			b.keyGone(ss, k, resp.Header.Revision, lease)
		}
	}
	return resp.Header.Revision, nil
}

// keyGone reports that key was deleted (by is 0) or written with lease by
// at revision rev. Only a publication of ss whose put is older is lost; one
// whose put is still in flight decides when it knows its revision.
func (b *backend) keyGone(ss *session, key string, rev int64, by clientv3.LeaseID) {
	b.mu.Lock()
	p := b.pubs[key]
	if p == nil || p.sess != ss {
		b.mu.Unlock()
		return
	}
	if p.rev == 0 {
		if rev > p.goneAt {
			p.goneAt, p.goneBy = rev, by
		}
		b.mu.Unlock()
		return
	}
	if rev <= p.rev {
		b.mu.Unlock()
		return
	}
	err := b.lossLocked(key, by)
	b.mu.Unlock()
	p.Lose(err)
}

// lossLocked is why a publication of key is lost to a deletion (by 0) or a
// write by another lease; b.mu is held. A lease that took the key over is
// remembered: publishing the key again does not take it back from it.
func (b *backend) lossLocked(key string, by clientv3.LeaseID) error {
	if by == 0 || b.leases[by] {
		return ErrKeyGone
	}
	b.takenBy[key] = by
	return fmt.Errorf("%w: etcd: %s was written by lease %x: %w", registry.ErrConflict, key, int64(by), ErrKeyGone)
}

func (b *backend) loseSession(ss *session, err error) {
	ss.Lose(err)
	ss.cancel()
	b.mu.Lock()
	var lost []*publication
	for _, p := range b.pubs {
		if p.sess == ss {
			lost = append(lost, p)
		}
	}
	if b.sess == ss {
		b.sess = nil
	}
	b.mu.Unlock()
	for _, p := range lost {
		p.Lose(err)
	}
}

func (b *backend) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	p, err := b.publish(ctx, inst)
	if isLeaseNotFound(err) {
		// The lease was revoked or expired under us: one more try with a new one.
		p, err = b.publish(ctx, inst)
	}
	if err != nil {
		return nil, classify(err)
	}
	return p, nil
}

func (b *backend) publish(ctx context.Context, inst driver.Instance) (*publication, error) {
	val, err := b.encode(inst)
	if err != nil {
		return nil, err
	}
	key := b.key(inst)
	var p *publication
	for p == nil {
		ss, err := b.session(ctx)
		if err != nil {
			return nil, err
		}
		b.mu.Lock()
		if !ss.retire && !ss.IsLost() && !ss.stale {
			p = &publication{b: b, key: key, service: inst.Service, sess: ss}
			old := b.pubs[key]
			b.pubs[key] = p
			ss.n++
			if old != nil {
				old.sess.n--
				defer old.Lose(errors.New("etcd: replaced by a newer registration"))
				if old.sess != ss && old.sess.retire && old.sess.n == 0 {
					// Left on a lease rotate moved away from (unmove, or a
					// put in flight then): nothing needs it now.
					defer b.retireLater(old.sess)
				}
			}
		}
		b.mu.Unlock()
		// A session being retired or lost meanwhile: the next call to
		// session grants another.
	}
	rev, err := b.put(ctx, p, val, inst.Addr)
	if err != nil {
		b.forget(p)
		if isLeaseNotFound(err) {
			b.loseSession(p.sess, ErrLeaseLost)
		}
		return nil, err
	}
	// p.sess may change from here on (rotate moves publications whose put
	// is done), so it is read under b.mu.
	b.mu.Lock()
	p.rev = rev
	var lossErr error
	if p.goneAt > rev {
		lossErr = b.lossLocked(key, p.goneBy)
	} else {
		delete(b.takenBy, key)
	}
	ss := p.sess
	b.guardLocked(ss, inst.Service, rev)
	switch {
	case lossErr != nil:
	case ss.IsLost():
		lossErr = ss.Err()
	case ss.stale:
		lossErr = fmt.Errorf("%w: not renewed within its TTL (%v)", ErrLeaseLost, b.opts.TTL)
	}
	var old, ns *session
	var from int64
	if lossErr == nil {
		old, ns, from = b.takeLocked(p)
	}
	b.mu.Unlock()
	if lossErr != nil {
		p.Lose(lossErr)
	}
	if ns != nil {
		// rotate moved the session's publications while this put was in
		// flight: the old lease is the one a thawed leader may revoke.
		b.move(ctx, p, from, old, ns)
		b.mu.Lock()
		empty := old.n == 0
		b.mu.Unlock()
		if empty {
			b.retireLater(old)
		}
	}
	return p, nil
}

// takeLocked moves p to the live session if rotate retired p's session
// since p's put was sent, and returns the two sessions and the revision to
// move from (ns nil if there is nothing to move). b.mu is held.
func (b *backend) takeLocked(p *publication) (old, ns *session, from int64) {
	old, ns = p.sess, b.sess
	if b.pubs[p.key] != p || !old.retire || old.IsLost() || ns == nil || ns == old || ns.retire || ns.stale || ns.IsLost() {
		return nil, nil, 0
	}
	p.sess = ns
	old.n--
	ns.n++
	b.guardLocked(ns, p.service, p.rev)
	from, p.rev = p.rev, 0
	return old, ns, from
}

// fenceDir holds the fence keys, under the prefix: never a service
// directory (a service name cannot start with a dot).
const fenceDir = ".fence"

// fenceKey is the fence key of lease (see put): outside every service
// directory, and written with the lease, so it goes with it.
func (b *backend) fenceKey(lease clientv3.LeaseID) string {
	return b.opts.Prefix + fenceDir + "/" + strconv.FormatInt(int64(lease), 16)
}

// putTxn is the transaction of put: write key with lease if cmp holds and
// the lease's fence key is at revision fence.
func (b *backend) putTxn(ctx context.Context, key, val string, lease clientv3.LeaseID, cmp clientv3.Cmp, fence int64) (*clientv3.TxnResponse, error) {
	fk := b.fenceKey(lease)
	return b.cli.Txn(ctx).If(cmp, clientv3.Compare(clientv3.ModRevision(fk), "=", fence)).
		Then(clientv3.OpPut(key, val, clientv3.WithLease(lease))).
		Else(clientv3.OpGet(key), clientv3.OpGet(fk, clientv3.WithKeysOnly())).
		Commit()
}

// put writes p's key with p's lease, in a transaction that succeeds only
// if the key is absent or this backend may take it over (mayTake), and
// returns the revision of the write.
//
// A try of the transaction that ran out of its deadline on a frozen member
// is made again on the next (shortTries), and the first may still apply
// when that member thaws: after a Withdraw it would write the key again,
// for every watcher to see until a guard sweeps it (a CI run: a
// deregistered instance came back at the thaw). An absent key cannot tell
// that it was deleted since, so the transaction also compares the lease's
// fence key, which every Withdraw writes in the transaction that deletes
// the key (unput): a try sent before a withdrawal fails after it. A put
// that finds the fence moved (another withdrawal by this backend) reads
// its revision and is sent again.
func (b *backend) put(ctx context.Context, p *publication, val, addr string) (int64, error) {
	cmp := clientv3.Compare(clientv3.CreateRevision(p.key), "=", 0)
	ctx = retried(clientv3.WithRequireLeader(ctx))
	b.mu.Lock()
	lease := p.sess.id
	fence := b.fences[lease]
	b.mu.Unlock()
	for tries, fenced := 0, 0; tries < 5 && fenced < maxFenced; {
		resp, err := b.putTxn(ctx, p.key, val, lease, cmp, fence)
		if err != nil {
			return 0, err
		}
		if resp.Succeeded {
			b.sawTerm(resp.Header.RaftTerm)
			return resp.Header.Revision, nil
		}
		var cur int64
		if fkvs := resp.Responses[1].GetResponseRange().GetKvs(); len(fkvs) > 0 {
			cur = fkvs[0].ModRevision
		}
		if cur != fence {
			fence = cur
			b.fenced(lease, cur)
			fenced++
			continue
		}
		tries++
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 { // deleted since
			cmp = clientv3.Compare(clientv3.CreateRevision(p.key), "=", 0)
			continue
		}
		if err := b.mayTake(kvs[0], addr); err != nil {
			return 0, err
		}
		cmp = clientv3.Compare(clientv3.ModRevision(p.key), "=", kvs[0].ModRevision)
	}
	return 0, fmt.Errorf("etcd: %s changed under every attempt to write it", p.key)
}

// maxFenced bounds how many times one put is sent again because withdrawals
// by this backend moved the fence meanwhile.
const maxFenced = 100

// fenced records that lease's fence key is at revision rev.
func (b *backend) fenced(lease clientv3.LeaseID, rev int64) {
	b.mu.Lock()
	b.fences[lease] = max(b.fences[lease], rev)
	b.mu.Unlock()
}

// mayTake reports, with an error wrapping registry.ErrConflict, whether the
// existing kv belongs to another live registrar at another address: a key
// with no lease, a lease of this backend or the same address may be
// written; a key that another lease took over from this backend is left to
// it.
func (b *backend) mayTake(kv *mvccpb.KeyValue, addr string) error {
	lease := clientv3.LeaseID(kv.Lease)
	b.mu.Lock()
	ours, taken := b.leases[lease], b.takenBy[string(kv.Key)] == lease
	b.mu.Unlock()
	if lease == 0 || ours {
		return nil
	}
	v := struct{ Addr string }{b.codec.addr(kv.Value)}
	if taken {
		return fmt.Errorf("%w: etcd: %s was taken over by lease %x (address %s); not taking it back", registry.ErrConflict, kv.Key, int64(lease), v.Addr)
	}
	if v.Addr == addr {
		return nil
	}
	return fmt.Errorf("%w: etcd: %s is held by lease %x at another address (%s)", registry.ErrConflict, kv.Key, int64(lease), v.Addr)
}

var errLeaseNotFound = rpctypes.ErrLeaseNotFound

func isLeaseNotFound(err error) bool {
	return errors.Is(err, errLeaseNotFound)
}

// forget drops p from the publications (once) and returns its session
// and whether that has none left.
func (b *backend) forget(p *publication) (ss *session, last bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pubs[p.key] == p {
		delete(b.pubs, p.key)
		p.sess.n--
	}
	return p.sess, p.sess.n == 0
}

type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	key         string
	service     string
	sess        *session
	// Guarded by b.mu: the revision of the last put of this publication (0
	// while the first is in flight, or while rotate moves it to a lease of
	// a later term), and the latest deletion or foreign write the guard saw
	// meanwhile.
	rev    int64
	goneAt int64
	goneBy clientv3.LeaseID
}

// Update writes inst over the key if it still carries the publication's
// lease. If it does not (deleted, or taken by someone else), the
// publication is lost instead and Update returns nil: the registration
// publishes inst again, under the ownership rules of Publish.
func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	b := p.b
	val, err := b.encode(inst)
	if err != nil {
		return err
	}
	// The key must carry the lease and be as this publication last wrote
	// it: a try of an earlier Update that a frozen member applies late
	// cannot write over a newer value.
	b.mu.Lock()
	rev, lease := p.rev, p.sess.id
	b.mu.Unlock()
	resp, err := b.cli.Txn(retried(clientv3.WithRequireLeader(ctx))).
		If(clientv3.Compare(clientv3.LeaseValue(p.key), "=", lease), clientv3.Compare(clientv3.ModRevision(p.key), "=", rev)).
		Then(clientv3.OpPut(p.key, val, clientv3.WithLease(lease))).
		Else(clientv3.OpGet(p.key, clientv3.WithKeysOnly())).
		Commit()
	if err != nil {
		return classify(err)
	}
	if !resp.Succeeded {
		var by clientv3.LeaseID
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
			by = clientv3.LeaseID(kvs[0].Lease)
		}
		b.mu.Lock()
		lossErr := b.lossLocked(p.key, by)
		b.mu.Unlock()
		p.Lose(lossErr)
		return nil
	}
	b.mu.Lock()
	p.rev = max(p.rev, resp.Header.Revision)
	b.mu.Unlock()
	b.sawTerm(resp.Header.RaftTerm)
	return nil
}

// Withdraw deletes the key if it still carries this session's lease, and
// revokes the lease when no publication needs it any more. Each step is
// safe to repeat: a Withdraw that failed may be called again, and returns
// nil once the key is gone and the lease, if it was the last publication's,
// revoked.
func (p *publication) Withdraw(ctx context.Context) error {
	b := p.b
	ss, last := b.forget(p)
	p.Lose(errWithdrawn)
	if err := b.unput(ctx, p.key, ss); err != nil {
		return classify(err)
	}
	if last {
		return b.retire(ctx, ss)
	}
	return nil
}

// unput deletes key if it carries ss's lease, or another lease of this
// backend while no publication holds the key: rotate may be moving it
// between the backend's leases (the move's transaction then finds it gone).
// A key another registrar wrote, or that a newer publication holds, is
// left. The delete writes the fence key of the lease the key carries, in
// the same transaction, so that no put of it sent before applies after
// (see put).
func (b *backend) unput(ctx context.Context, key string, ss *session) error {
	lease := ss.id
	cmp := clientv3.Compare(clientv3.LeaseValue(key), "=", lease)
	for range 5 {
		resp, err := b.cli.Txn(retried(clientv3.WithRequireLeader(ctx))).
			If(cmp).
			Then(clientv3.OpDelete(key), clientv3.OpPut(b.fenceKey(lease), "", clientv3.WithLease(lease))).
			Else(clientv3.OpGet(key, clientv3.WithKeysOnly())).
			Commit()
		if err != nil {
			return err
		}
		if resp.Succeeded {
			b.fenced(lease, resp.Header.Revision)
			return nil
		}
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			return nil
		}
		b.mu.Lock()
		ours := b.leases[clientv3.LeaseID(kvs[0].Lease)] && b.pubs[key] == nil
		b.mu.Unlock()
		if !ours {
			return nil
		}
		lease = clientv3.LeaseID(kvs[0].Lease)
		cmp = clientv3.Compare(clientv3.ModRevision(key), "=", kvs[0].ModRevision)
	}
	return fmt.Errorf("etcd: %s changed under every attempt to delete it", key)
}

// retireLater retires ss in the background, within the TTL.
func (b *backend) retireLater(ss *session) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ctx.Err() != nil {
		return // Close revokes what is left
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		ctx, cancel := context.WithTimeout(b.ctx, b.opts.TTL)
		defer cancel()
		if err := b.retire(ctx, ss); err != nil {
			b.log.Warn("etcd: revoking a lease no registration uses", "lease", fmt.Sprintf("%x", int64(ss.id)), "err", err)
		}
	}()
}

// retire revokes ss once no publication uses it. It is safe to repeat
// until it succeeds.
func (b *backend) retire(ctx context.Context, ss *session) error {
	b.sessMu.Lock() // no session handed out meanwhile
	b.mu.Lock()
	if ss.n > 0 {
		b.mu.Unlock()
		b.sessMu.Unlock()
		return nil
	}
	ss.retire = true
	if b.sess == ss {
		b.sess = nil
	}
	b.mu.Unlock()
	b.sessMu.Unlock()
	ss.Lose(errNoRegistrations)
	ss.cancel()
	if _, err := b.cli.Revoke(retried(ctx), ss.id); err != nil && !isLeaseNotFound(err) {
		return classify(err)
	}
	return nil
}
