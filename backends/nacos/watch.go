package nacos

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client/naming_cache"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/nacos-group/nacos-sdk-go/v2/util"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// subscription is the backend's one SDK subscription to a service, shared
// by its streams, its Lookups and its publications of that service.
type subscription struct {
	b     *backend
	name  string
	param *vo.SubscribeParam // the SDK tells callbacks apart by &param.SubscribeCallback

	// Guarded by backend.mu.
	refs      int
	idleSince time.Time

	mu         sync.Mutex
	subscribed bool
	tried      bool     // an SDK subscribe was made: the SDK may hold a redo entry for it
	opening    *attempt // the SDK subscribe in progress, if any
	dead       bool
	ready      bool                       // snap holds a list from the server
	ref        uint64                     // the SDK's lastRefTime of snap, 0 if unknown
	dups       map[string][]string        // ID → every address the list has for it, for IDs with more than one
	snap       map[string]driver.Instance // never modified: replaced
	delta      driver.Event               // from the list of version ver-1 to snap
	ver        uint64
	changed    chan struct{} // closed and replaced on every new list
}

func (b *backend) acquireSubLocked(service string) *subscription {
	s := b.subs[service]
	if s == nil {
		s = &subscription{b: b, name: service, changed: make(chan struct{})}
		s.param = &vo.SubscribeParam{ServiceName: service, GroupName: b.group, SubscribeCallback: s.onPush}
		b.subs[service] = s
	}
	s.refs++
	return s
}

func (b *backend) acquireSub(service string) *subscription {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.acquireSubLocked(service)
}

func (b *backend) releaseSubLocked(s *subscription) {
	if s.refs--; s.refs == 0 {
		s.idleSince = time.Now()
	}
}

func (b *backend) releaseSub(s *subscription) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.releaseSubLocked(s)
}

// nameLock serialises the SDK subscribe and unsubscribe calls of a service,
// across successive subscriptions to it.
func (b *backend) nameLock(service string) *sync.Mutex {
	b.mu.Lock()
	defer b.mu.Unlock()
	l := b.nameLocks[service]
	if l == nil {
		l = new(sync.Mutex)
		b.nameLocks[service] = l
	}
	return l
}

// attempt is one SDK subscribe in progress; its waiters share its outcome.
type attempt struct {
	done chan struct{}
	err  error // set before done is closed
}

// subscribe makes the SDK subscription if it is not made yet, and returns
// once the subscription holds a list, or when ctx is done: the SDK call
// (which takes no context and waits up to its request timeout) runs on a
// goroutine of its own and completes the subscription for the next caller.
func (s *subscription) subscribe(ctx context.Context, cli naming_client.INamingClient) error {
	s.mu.Lock()
	switch {
	case s.dead:
		s.mu.Unlock()
		return errClosed
	case s.subscribed:
		s.mu.Unlock()
		return nil
	}
	if err := ctx.Err(); err != nil {
		s.mu.Unlock()
		return err
	}
	a := s.opening
	if a == nil {
		a = &attempt{done: make(chan struct{})}
		s.opening = a
		s.b.sends.Add(1)
		go s.open(cli, a)
	}
	s.mu.Unlock()
	select {
	case <-a.done:
		return a.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// open runs one SDK subscribe for subscribe.
func (s *subscription) open(cli naming_client.INamingClient, a *attempt) {
	defer s.b.sends.Done()
	l := s.b.nameLock(s.name)
	l.Lock()
	a.err = s.openLocked(cli)
	l.Unlock()
	s.mu.Lock()
	s.opening = nil
	s.mu.Unlock()
	close(a.done)
}

func (s *subscription) openLocked(cli naming_client.INamingClient) error {
	s.mu.Lock()
	done, dead := s.subscribed, s.dead
	s.mu.Unlock()
	if dead {
		return errClosed
	}
	if done {
		return nil
	}
	// The SDK calls s.onPush from inside Subscribe when the answer is new.
	s.mu.Lock()
	s.tried = true
	s.mu.Unlock()
	if err := cli.Subscribe(s.param); err != nil {
		s.dropCallback(cli)
		return fmt.Errorf("%w: nacos: subscribe to %s: %w", sdkErrKind(err), s.name, err)
	}
	s.mu.Lock()
	s.subscribed = true
	ready := s.ready
	s.mu.Unlock()
	if ready {
		return nil
	}
	// No callback: the SDK's cache already had this service (a client of
	// the caller's that subscribed itself) or dropped an empty answer.
	hosts, err := cli.SelectAllInstances(vo.SelectAllInstancesParam{ServiceName: s.name, GroupName: s.b.group})
	if err != nil {
		return fmt.Errorf("%w: nacos: reading %s: %w", sdkErrKind(err), s.name, err)
	}
	s.apply(hosts, true)
	return nil
}

// dropCallback removes s.onPush from the SDK after a failed Subscribe:
// nacos-sdk-go v2.3.5 adds the callback before its request and keeps it
// when the request fails, so each failed try would leave one more (each
// converting every push, for good). The SDK's own cache is reached as the
// connection hook reaches it; with another client, Unsubscribe removes the
// callback (and, none being left, tells the server, within the SDK's
// request timeout).
func (s *subscription) dropCallback(cli naming_client.INamingClient) {
	if h, ok := serviceCache(cli); ok {
		h.DeregisterCallback(util.GetGroupName(s.param.ServiceName, s.param.GroupName), "",
			naming_cache.NewSubscribeCallbackFuncWrapper(naming_cache.NewClusterSelector(s.param.Clusters), &s.param.SubscribeCallback))
		return
	}
	_ = cli.Unsubscribe(s.param)
}

// unsubscribe drops the SDK subscription. The subscription is dead after it.
func (s *subscription) unsubscribe(cli naming_client.INamingClient) {
	l := s.b.nameLock(s.name)
	l.Lock()
	defer l.Unlock()
	s.mu.Lock()
	// A subscribe that failed still left the SDK a redo entry, which its
	// reconnect turns into a subscription on the server: unsubscribe then
	// too.
	was := s.subscribed || s.tried
	s.dead, s.subscribed = true, false
	s.mu.Unlock()
	if was {
		if err := cli.Unsubscribe(s.param); err != nil {
			s.b.log.Debug("nacos: unsubscribe failed", "service", s.name, "err", err)
		}
	}
}

// onPush is the SDK callback. It runs on SDK goroutines (the push stream,
// the redo, a Subscribe call): it only copies the list and wakes waiters.
// hosts belongs to the SDK's cache and must not be kept.
func (s *subscription) onPush(hosts []model.Instance, err error) {
	if err != nil {
		s.b.log.Warn("nacos: subscription error; keeping the last list", "service", s.name, "err", err)
		return
	}
	s.apply(hosts, false)
}

// apply makes the service's newest list the subscription's list.
//
// The SDK's callbacks are news, not the order of news: after a reconnect
// the answer to its re-subscribe (its redo, on the connection-event
// goroutine) and the server's pushes (on the stream goroutine) are applied
// concurrently, each storing the list in the SDK's cache and then, after a
// disk write, calling back, so an older list can arrive last. So when the
// SDK's cache is reachable (a client made by the SDK), the list taken is the
// cache's, with its lastRefTime, and a list not newer than the one held is
// dropped, by the rule the SDK itself applies to what the server sends.
// With another client type, hosts is taken as it comes. The initial read
// (initial) is kept only if no callback has delivered a list meanwhile.
func (s *subscription) apply(hosts []model.Instance, initial bool) {
	var ref uint64
	if h := s.b.cache.Load(); h != nil {
		svc, ok := h.GetServiceInfo(s.name, s.b.group, "")
		if !ok {
			return // unsubscribed meanwhile; nothing to keep
		}
		hosts, ref = svc.Hosts, svc.LastRefTime
	}
	s.mu.Lock()
	if s.dead || (initial && s.ready) || (ref != 0 && s.ready && ref <= s.ref) {
		s.mu.Unlock()
		return
	}
	prev, ver := s.snap, s.ver
	s.mu.Unlock()
	// Convert against the list current at the time, and diff again if
	// another list came in meanwhile.
	snap, delta := s.b.convert(s.name, hosts, prev)
	dups := s.b.dupAddrs(hosts)
	s.mu.Lock()
	if s.dead || (initial && s.ready) || (ref != 0 && s.ready && ref <= s.ref) {
		s.mu.Unlock()
		return
	}
	if s.ver != ver {
		delta = diff(s.snap, snap)
	}
	s.ref, s.dups = ref, dups
	s.setLocked(snap, delta)
	s.mu.Unlock()
	if !initial {
		s.b.checkAbsence(s.name, snap)
	}
}

func (s *subscription) setLocked(snap map[string]driver.Instance, delta driver.Event) {
	s.snap, s.delta, s.ready = snap, delta, true
	s.ver++
	close(s.changed)
	s.changed = make(chan struct{})
}

// view returns the current list and a channel closed when it changes.
func (s *subscription) view() (snap map[string]driver.Instance, ver uint64, ready bool, changed <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap, s.ver, s.ready, s.changed
}

// since returns what changed from the list of version ver to the current
// one (ver is older), and the current list and version.
func (s *subscription) since(ver uint64, old map[string]driver.Instance) (driver.Event, map[string]driver.Instance, uint64) {
	s.mu.Lock()
	snap, cur, delta := s.snap, s.ver, s.delta
	s.mu.Unlock()
	if cur == ver+1 {
		return delta, snap, cur
	}
	return diff(old, snap), snap, cur
}

// waitFor waits until cond holds of the list, up to max (0: no limit) or
// ctx.
func (s *subscription) waitFor(ctx context.Context, max time.Duration, what string, cond func(map[string]driver.Instance) bool) error {
	var timeout <-chan time.Time
	if max > 0 {
		t := time.NewTimer(max)
		defer t.Stop()
		timeout = t.C
	}
	for {
		snap, _, ready, ch := s.view()
		if ready && cond(snap) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("nacos: waiting for the server to show %s: %w", what, ctx.Err())
		case <-s.b.ctx.Done():
			return errClosed
		case <-timeout:
			return errors.New("nacos: not shown yet")
		}
	}
}

// convert turns a pushed list into rollcall instances keyed by ID (see the
// package doc), and returns what changed since prev. Instances Nacos would
// not route to are left out; invalid ones are kept for the shared layer to
// log and skip. Instances unchanged since prev are prev's values, shared:
// lists are never modified. hosts belongs to the SDK and is not kept.
func (b *backend) convert(service string, hosts []model.Instance, prev map[string]driver.Instance) (map[string]driver.Instance, driver.Event) {
	m := make(map[string]driver.Instance, len(hosts))
	var ev driver.Event
	for i := range hosts {
		h := &hosts[i]
		if !b.routable(h) {
			continue
		}
		addr, id := hostID(h)
		if old, dup := m[id]; dup {
			b.log.Debug("nacos: two instances with one ID; keeping the first", "service", service, "id", id, "kept", old.Addr, "skipped", addr)
			continue
		}
		if p, ok := prev[id]; ok && p.Addr == addr && sameMetadata(p.Metadata, h) {
			m[id] = p
			continue
		}
		in := driver.Instance{Service: service, ID: id, Addr: addr, Metadata: metadata(h)}
		m[id] = in
		ev.Changes = append(ev.Changes, driver.Put(in))
	}
	for id := range prev {
		if _, ok := m[id]; !ok {
			ev.Changes = append(ev.Changes, driver.Delete(id))
		}
	}
	sortChanges(ev.Changes)
	return m, ev
}

// dupAddrs returns, for each ID that more than one routable instance of
// hosts carries, all their addresses (convert keeps one of them).
func (b *backend) dupAddrs(hosts []model.Instance) map[string][]string {
	var all map[string][]string
	seen := make(map[string]string, len(hosts))
	for i := range hosts {
		h := &hosts[i]
		if !b.routable(h) || h.Metadata[MetaID] == "" { // its ID is its address
			continue
		}
		addr, id := hostID(h)
		first, dup := seen[id]
		if !dup {
			seen[id] = addr
			continue
		}
		if all == nil {
			all = map[string][]string{}
		}
		if len(all[id]) == 0 {
			all[id] = []string{first}
		}
		if !slices.Contains(all[id], addr) {
			all[id] = append(all[id], addr)
		}
	}
	return all
}

// routable reports whether h is an instance Nacos would route to, in the
// backend's cluster when it has one.
func (b *backend) routable(h *model.Instance) bool {
	return h.Enable && h.Healthy && h.Weight > 0 && (b.filter == "" || clusterName(h.ClusterName) == b.filter)
}

// hostID returns h's address and rollcall ID (its address when it has none).
func hostID(h *model.Instance) (addr, id string) {
	addr = net.JoinHostPort(h.Ip, strconv.FormatUint(h.Port, 10))
	if id = h.Metadata[MetaID]; id == "" {
		id = addr
	}
	return addr, id
}

// holders returns the addresses the current list has for id.
func (s *subscription) holders(id string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.dups[id]; len(d) > 0 {
		return slices.Clone(d)
	}
	if in, ok := s.snap[id]; ok {
		return []string{in.Addr}
	}
	return nil
}

// weightMeta is the MetaWeight value an instance without one gets from its
// Nacos weight, or "" for the default weight 1.
func weightMeta(h *model.Instance) string {
	if _, ok := h.Metadata[registry.MetaWeight]; ok || h.Weight == 1 {
		return ""
	}
	return strconv.Itoa(int(math.Min(math.Max(math.Round(h.Weight), 1), registry.MaxWeight)))
}

// metadata is the rollcall metadata of a Nacos instance.
func metadata(h *model.Instance) map[string]string {
	w := weightMeta(h)
	if len(h.Metadata) == 0 && w == "" {
		return nil
	}
	md := make(map[string]string, len(h.Metadata)+1)
	for k, v := range h.Metadata {
		if k != MetaID {
			md[k] = v
		}
	}
	if w != "" {
		md[registry.MetaWeight] = w
	}
	if len(md) == 0 {
		return nil
	}
	return md
}

// sameMetadata reports whether md is metadata(h), without building it.
func sameMetadata(md map[string]string, h *model.Instance) bool {
	n := 0
	for k, v := range h.Metadata {
		if k == MetaID {
			continue
		}
		if mv, ok := md[k]; !ok || mv != v {
			return false
		}
		n++
	}
	if w := weightMeta(h); w != "" {
		if md[registry.MetaWeight] != w {
			return false
		}
		n++
	}
	return n == len(md)
}

func clusterName(c string) string {
	if c == "" {
		return DefaultCluster
	}
	return c
}

// sortedList returns the instances of m sorted by ID. They share their
// metadata with m: package registry copies what it keeps.
func sortedList(m map[string]driver.Instance) []driver.Instance {
	out := make([]driver.Instance, 0, len(m))
	for _, id := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[id])
	}
	return out
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	cli, err := b.client(ctx)
	if err != nil {
		return nil, err
	}
	if h := b.health(); !h.up {
		return nil, h.err
	}
	if rc, ok := rpcClient(cli); ok && !rc.IsRunning() {
		// The SDK lost its connection (its list may be stale), and the
		// probe has not yet seen the server gone for long.
		return nil, errNotSynced
	}
	s := b.acquireSub(service)
	defer b.releaseSub(s)
	if err := s.subscribe(ctx, cli); err != nil {
		return nil, err
	}
	// The subscription's list is the SDK's cache: a Lookup answers only
	// after the server has answered too (the SDK may not have noticed yet
	// that it is gone), as Ping does.
	if err := b.Ping(ctx); err != nil {
		return nil, err
	}
	snap, _, _, _ := s.view()
	return sortedList(snap), nil
}

func (b *backend) Watch(ctx context.Context, service string) (driver.Stream, error) {
	cli, err := b.client(ctx)
	if err != nil {
		return nil, err
	}
	s := b.acquireSub(service)
	if err := s.subscribe(ctx, cli); err != nil {
		b.releaseSub(s)
		return nil, err
	}
	return &stream{b: b, s: s, done: make(chan struct{})}, nil
}

var (
	errNotSynced    = fmt.Errorf("%w: nacos: the SDK is not connected to the server", registry.ErrUnavailable)
	errConnReplaced = fmt.Errorf("%w: nacos: the SDK's connection to the server was replaced: the server dropped this client's "+
		"subscription with the old one (and, after a restart, every client's instances until they redo); listing again", registry.ErrUnavailable)
)

// stream is one watch of a subscription. It fails when the server becomes
// unreachable after its first event, and when the SDK replaces its
// connection: what the server showed meanwhile (a restarted server lists
// nothing until every client has redone its registrations) is a
// resynchronisation, which the shared layer handles as one (the watcher is
// stale, and removals of instances listed before are held back for its
// resync grace), not a change to pass on. A stream opened while the server
// is unreachable, or before the SDK has redone its subscriptions on a new
// connection, waits for them.
type stream struct {
	b         *backend
	s         *subscription
	done      chan struct{}
	closeOnce sync.Once

	started bool
	gen     uint64 // backend down generation when the stream started
	connGen uint64 // backend connection generation when the stream started
	ver     uint64
	last    map[string]driver.Instance
}

func (st *stream) Next(ctx context.Context) (driver.Event, error) {
	for {
		// The list first: a list applied after a connection was replaced
		// (the SDK's redo applies the new connection's lists after the
		// DISCONNECTED event) is then always seen with the new generation.
		snap, ver, ready, ch := st.s.view()
		h := st.b.health()
		if st.started && (!h.up || h.gen != st.gen) {
			err := h.err
			if err == nil {
				err = fmt.Errorf("%w: nacos: the server was unreachable", registry.ErrUnavailable)
			}
			return driver.Event{}, err
		}
		if st.started && h.connGen != st.connGen {
			return driver.Event{}, errConnReplaced
		}
		if h.up && ready && (st.started || h.synced) {
			if !st.started {
				st.started, st.gen, st.connGen, st.ver, st.last = true, h.gen, h.connGen, ver, snap
				return driver.ResetEvent(sortedList(snap)), nil
			}
			if ver != st.ver {
				var ev driver.Event
				ev, st.last, st.ver = st.s.since(st.ver, st.last)
				if len(ev.Changes) > 0 {
					return ev, nil
				}
				continue
			}
		}
		select {
		case <-ch:
		case <-h.changed:
		case <-ctx.Done():
			return driver.Event{}, ctx.Err()
		case <-st.done:
			return driver.Event{}, errClosed
		case <-st.b.ctx.Done():
			return driver.Event{}, errClosed
		}
	}
}

// diff is the event that turns old into cur.
func diff(old, cur map[string]driver.Instance) driver.Event {
	var ev driver.Event
	for id, in := range cur {
		if o, ok := old[id]; !ok || !sameInstance(o, in) {
			ev.Changes = append(ev.Changes, driver.Put(in))
		}
	}
	for id := range old {
		if _, ok := cur[id]; !ok {
			ev.Changes = append(ev.Changes, driver.Delete(id))
		}
	}
	sortChanges(ev.Changes)
	return ev
}

// sortChanges orders a diff's changes by ID (each ID appears once, so the
// order does not change their meaning; it keeps tests deterministic).
func sortChanges(cs []driver.Change) {
	slices.SortFunc(cs, func(a, b driver.Change) int { return strings.Compare(a.ID, b.ID) })
}

func (st *stream) Close() error {
	st.closeOnce.Do(func() {
		close(st.done)
		st.b.releaseSub(st.s)
	})
	return nil
}
