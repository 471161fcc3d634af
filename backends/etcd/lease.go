package etcd

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Reasons a publication is lost.
var (
	ErrLeaseLost = errors.New("etcd: lease expired or revoked")
	ErrKeyGone   = errors.New("etcd: key deleted or overwritten by someone else")
)

// session is the backend's lease and the loops that keep and guard it.
type session struct {
	driver.Loss
	n      int // publications in b.pubs using this session; guarded by b.mu
	id     clientv3.LeaseID
	cancel context.CancelFunc
}

// session returns the live session, granting a lease and starting its
// keepalive and key guard if there is none.
func (b *backend) session(ctx context.Context) (*session, error) {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	b.mu.Lock()
	cur := b.sess
	b.mu.Unlock()
	if cur != nil && !cur.IsLost() {
		return cur, nil
	}
	if b.ctx.Err() != nil {
		return nil, errors.New("etcd: backend closed")
	}
	if err := b.connect(ctx); err != nil {
		return nil, err
	}
	secs := int64((b.opts.TTL + time.Second - 1) / time.Second)
	grant, err := b.cli.Grant(clientv3.WithRequireLeader(ctx), secs)
	if err != nil {
		return nil, err
	}
	kctx, cancel := context.WithCancel(b.ctx)
	ka, err := b.cli.KeepAlive(kctx, grant.ID)
	if err != nil {
		cancel()
		return nil, err
	}
	ss := &session{id: grant.ID, cancel: cancel}
	b.mu.Lock()
	b.sess = ss
	b.mu.Unlock()
	b.wg.Add(2)
	go b.keepAlive(kctx, ss, ka)
	go b.guard(kctx, ss, grant.Revision)
	return ss, nil
}

// keepAlive drains clientv3's keepalive responses. The channel closes when
// the lease is gone or was not renewed within its TTL (clientv3 gives up
// then): the session is lost.
func (b *backend) keepAlive(ctx context.Context, ss *session, ka <-chan *clientv3.LeaseKeepAliveResponse) {
	defer b.wg.Done()
	for range ka {
	}
	if ctx.Err() == nil {
		b.loseSession(ss, ErrLeaseLost)
	}
}

// guard watches the prefix for deletions or overwrites of this session's
// keys. After a watch failure it checks every key it holds.
func (b *backend) guard(ctx context.Context, ss *session, rev int64) {
	defer b.wg.Done()
	for attempt := 0; ctx.Err() == nil; attempt++ {
		wch := b.cli.Watch(clientv3.WithRequireLeader(ctx), b.opts.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		for resp := range wch {
			if err := resp.Err(); err != nil {
				break
			}
			attempt = 0
			for _, ev := range resp.Events {
				if ev.Kv.ModRevision > rev {
					rev = ev.Kv.ModRevision
				}
				if ev.Type == mvccpb.DELETE || clientv3.LeaseID(ev.Kv.Lease) != ss.id {
					b.keyGone(ss, string(ev.Kv.Key), ev.Kv.ModRevision)
				}
			}
		}
		if ctx.Err() != nil || ss.IsLost() {
			return
		}
		// The watch ended (compaction, lost leader): re-check every key.
		delay := time.Duration(min(attempt+1, 10)) * 200 * time.Millisecond
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		r, err := b.verify(ctx, ss)
		if err == nil {
			rev = r
		}
	}
}

// verify checks that every key of ss still carries ss's lease and returns
// the revision it read at.
func (b *backend) verify(ctx context.Context, ss *session) (int64, error) {
	b.mu.Lock()
	var keys []string
	for k, p := range b.pubs {
		if p.sess == ss {
			keys = append(keys, k)
		}
	}
	b.mu.Unlock()
	resp, err := b.cli.Get(clientv3.WithRequireLeader(ctx), b.opts.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, err
	}
	have := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		have[string(kv.Key)] = clientv3.LeaseID(kv.Lease) == ss.id
	}
	for _, k := range keys {
		if !have[k] {
			b.keyGone(ss, k, resp.Header.Revision)
		}
	}
	return resp.Header.Revision, nil
}

// keyGone reports that key was deleted or overwritten at revision rev; a
// publication made after that is not affected.
func (b *backend) keyGone(ss *session, key string, rev int64) {
	b.mu.Lock()
	p := b.pubs[key]
	b.mu.Unlock()
	if p != nil && p.sess == ss && rev > p.rev.Load() {
		p.Lose(ErrKeyGone)
	}
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
	return p, unavailable(err)
}

func (b *backend) publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	val, err := encode(inst)
	if err != nil {
		return nil, err
	}
	ss, err := b.session(ctx)
	if err != nil {
		return nil, err
	}
	key := b.key(inst)
	p := &publication{b: b, key: key, sess: ss}
	b.mu.Lock()
	old := b.pubs[key]
	b.pubs[key] = p
	ss.n++
	if old != nil {
		old.sess.n--
	}
	b.mu.Unlock()
	if old != nil {
		old.Lose(errors.New("etcd: replaced by a newer registration"))
	}
	resp, err := b.cli.Put(clientv3.WithRequireLeader(ctx), key, val, clientv3.WithLease(ss.id))
	if err != nil {
		b.forget(p)
		if isLeaseNotFound(err) {
			b.loseSession(ss, ErrLeaseLost)
		}
		return nil, err
	}
	p.rev.Store(resp.Header.Revision)
	if ss.IsLost() {
		p.Lose(ss.Err())
	}
	return p, nil
}

var errLeaseNotFound = rpctypes.ErrLeaseNotFound

func isLeaseNotFound(err error) bool {
	return errors.Is(err, errLeaseNotFound)
}

func (b *backend) forget(p *publication) (last bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pubs[p.key] == p {
		delete(b.pubs, p.key)
		p.sess.n--
	}
	return p.sess.n == 0
}

type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	rev         atomic.Int64 // revision of the last put of this publication
	key         string
	sess        *session
}

func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	val, err := encode(inst)
	if err != nil {
		return err
	}
	resp, err := p.b.cli.Put(clientv3.WithRequireLeader(ctx), p.key, val, clientv3.WithLease(p.sess.id))
	if err != nil {
		return unavailable(err)
	}
	p.rev.Store(resp.Header.Revision)
	return nil
}

// Withdraw deletes the key if it still carries this session's lease, and
// revokes the lease when no publication needs it any more.
func (p *publication) Withdraw(ctx context.Context) error {
	last := p.b.forget(p)
	p.Lose(errors.New("etcd: withdrawn"))
	b := p.b
	_, err := b.cli.Txn(clientv3.WithRequireLeader(ctx)).
		If(clientv3.Compare(clientv3.LeaseValue(p.key), "=", p.sess.id)).
		Then(clientv3.OpDelete(p.key)).
		Commit()
	if err != nil {
		return unavailable(err)
	}
	if last {
		b.sessMu.Lock() // no session handed out meanwhile
		b.mu.Lock()
		current := b.sess == p.sess && p.sess.n == 0
		if current {
			b.sess = nil
		}
		b.mu.Unlock()
		b.sessMu.Unlock()
		if current {
			p.sess.Lose(errors.New("etcd: no registrations left"))
			p.sess.cancel()
			if _, err := b.cli.Revoke(ctx, p.sess.id); err != nil && !isLeaseNotFound(err) {
				return unavailable(err)
			}
		}
	}
	return nil
}
