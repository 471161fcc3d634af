package memory

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Errors the in-process server returns.
var (
	// ErrDown is returned while the server is stopped (see Server.Stop).
	ErrDown = fmt.Errorf("memory: server stopped: %w", registry.ErrUnavailable)
	// ErrLeaseNotFound means a lease expired or was revoked.
	ErrLeaseNotFound = errors.New("memory: lease not found")
	// ErrKeyGone means a published entry was deleted or replaced by someone else.
	ErrKeyGone = errors.New("memory: entry deleted by someone else")
	// ErrDataLost ends watches when the server's data is wiped.
	ErrDataLost = fmt.Errorf("memory: server data wiped: %w", registry.ErrUnavailable)
	// ErrConflict refuses a registration of an ID that another client's
	// live lease holds at another address.
	ErrConflict = fmt.Errorf("memory: instance ID held by another client: %w", registry.ErrConflict)
	// ErrPermissionDenied refuses the calls of a restricted user (see
	// Server.Restrict).
	ErrPermissionDenied = fmt.Errorf("memory: permission denied: %w", registry.ErrPermission)
)

var (
	serversMu sync.Mutex
	servers   = map[string]*Server{}
)

// NamedServer returns the in-process server that mem://name URLs open,
// creating it on first use. Servers live as long as the process.
func NamedServer(name string) *Server {
	serversMu.Lock()
	defer serversMu.Unlock()
	s := servers[name]
	if s == nil {
		s = NewServer()
		servers[name] = s
	}
	return s
}

// Server is an in-process registry server: entries bound to leases with a
// TTL, and watches. Its fault controls (Stop, Pause, Wipe, RevokeLeases,
// Delete, Put) and access control (Restrict) let tests exercise what
// happens when a real server fails or refuses.
// It is safe for concurrent use and starts no goroutine of its own; lease
// expiry runs on timers.
//
// Entries live in scopes: a service's name, or "namespace/service" for
// clients in a namespace (see Options.Namespace). Service names have no
// '/', so scopes of different namespaces never meet.
type Server struct {
	mu         sync.Mutex
	resumed    chan struct{} // closed while not paused
	down       bool
	nextID     int64
	leases     map[int64]*lease
	entries    map[string]map[string]*entry // scope → ID → entry
	subs       map[string]map[*stream]struct{}
	restricted map[string]bool // users whose calls are refused
}

// scope is where the entries of service live for clients in namespace ns.
func scope(ns, service string) string {
	if ns == "" {
		return service
	}
	return ns + "/" + service
}

type entry struct {
	inst  driver.Instance
	lease *lease
}

type lease struct {
	id      int64
	ttl     time.Duration
	timer   *time.Timer
	keys    map[[2]string]struct{}
	onLost  func(error)         // session lost
	onGone  func(key [2]string) // one entry deleted or replaced by someone else
	expires time.Time
}

// NewServer returns an empty server, not shared by name.
func NewServer() *Server {
	r := make(chan struct{})
	close(r)
	return &Server{resumed: r, leases: map[int64]*lease{}, entries: map[string]map[string]*entry{}, subs: map[string]map[*stream]struct{}{},
		restricted: map[string]bool{}}
}

// enter waits while the server is paused and fails while it is stopped, or
// when user may not do op. It returns with s.mu held on success.
func (s *Server) enter(ctx context.Context, user, op string) error {
	for {
		s.mu.Lock()
		if s.down {
			s.mu.Unlock()
			return ErrDown
		}
		r := s.resumed
		select {
		case <-r:
			if s.restricted[user] {
				s.mu.Unlock()
				return fmt.Errorf("%w: user %q may not %s", ErrPermissionDenied, user, op)
			}
			return nil
		default:
		}
		s.mu.Unlock()
		select {
		case <-r:
		case <-ctx.Done():
			return fmt.Errorf("memory: server not answering: %w", ctx.Err())
		}
	}
}

func (s *Server) grant(ctx context.Context, user string, ttl time.Duration, onLost func(error), onGone func([2]string)) (int64, error) {
	if err := s.enter(ctx, user, "grant a lease"); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	s.nextID++
	l := &lease{id: s.nextID, ttl: ttl, keys: map[[2]string]struct{}{}, onLost: onLost, onGone: onGone}
	s.leases[l.id] = l
	s.arm(l)
	return l.id, nil
}

// arm (re)starts a lease's expiry timer. s.mu is held.
func (s *Server) arm(l *lease) {
	l.expires = time.Now().Add(l.ttl)
	if l.timer != nil {
		l.timer.Stop()
	}
	l.timer = time.AfterFunc(l.ttl, func() { s.expire(l) })
}

func (s *Server) expire(l *lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leases[l.id] != l || s.down || time.Now().Before(l.expires) {
		return
	}
	select {
	case <-s.resumed:
	default:
		return // paused: the server does not run; Resume expires it
	}
	s.revokeLocked(l, ErrLeaseNotFound)
}

func (s *Server) keepAlive(ctx context.Context, user string, id int64) error {
	if err := s.enter(ctx, user, "renew a lease"); err != nil {
		return err
	}
	defer s.mu.Unlock()
	l := s.leases[id]
	if l == nil {
		return ErrLeaseNotFound
	}
	s.arm(l)
	return nil
}

func (s *Server) revoke(ctx context.Context, user string, id int64) error {
	if err := s.enter(ctx, user, "revoke a lease"); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if l := s.leases[id]; l != nil {
		l.onLost = nil // revoked by its owner: not a loss
		s.revokeLocked(l, nil)
	}
	return nil
}

func (s *Server) revokeLocked(l *lease, why error) {
	l.timer.Stop()
	delete(s.leases, l.id)
	for k := range l.keys {
		s.deleteLocked(k[0], k[1], false)
	}
	if l.onLost != nil && why != nil {
		l.onLost(why)
	}
}

// put writes inst into scope sc under leaseID. An entry of the same ID held
// by another live lease at another address is not overwritten (ErrConflict);
// at the same address it is taken over, as a restarted process takes over
// its own registration.
func (s *Server) put(ctx context.Context, user string, leaseID int64, sc string, inst driver.Instance) error {
	if err := s.enter(ctx, user, "write "+sc); err != nil {
		return err
	}
	defer s.mu.Unlock()
	l := s.leases[leaseID]
	if l == nil {
		return ErrLeaseNotFound
	}
	if old := s.entries[sc][inst.ID]; old != nil && old.lease != nil && old.lease != l && old.inst.Addr != inst.Addr {
		return fmt.Errorf("%w: %s %q is registered at %s by another client's lease", ErrConflict, inst.Service, inst.ID, old.inst.Addr)
	}
	s.putLocked(sc, inst, l)
	return nil
}

func (s *Server) putLocked(sc string, inst driver.Instance, l *lease) {
	k := [2]string{sc, inst.ID}
	m := s.entries[sc]
	if m == nil {
		m = map[string]*entry{}
		s.entries[sc] = m
	}
	if old := m[inst.ID]; old != nil && old.lease != nil && old.lease != l {
		delete(old.lease.keys, k)
		if old.lease.onGone != nil {
			old.lease.onGone(k)
		}
	}
	inst.Metadata = maps.Clone(inst.Metadata)
	m[inst.ID] = &entry{inst: inst, lease: l}
	if l != nil {
		l.keys[k] = struct{}{}
	}
	s.publishLocked(sc, driver.ChangeEvent(driver.Put(inst)))
}

// remove deletes an entry published under leaseID.
func (s *Server) remove(ctx context.Context, user string, leaseID int64, sc, id string) error {
	if err := s.enter(ctx, user, "delete from "+sc); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if e := s.entries[sc][id]; e != nil && e.lease != nil && e.lease.id == leaseID {
		s.deleteLocked(sc, id, false)
	}
	return nil
}

func (s *Server) deleteLocked(service, id string, foreign bool) {
	e := s.entries[service][id]
	if e == nil {
		return
	}
	delete(s.entries[service], id)
	if len(s.entries[service]) == 0 {
		delete(s.entries, service)
	}
	k := [2]string{service, id}
	if e.lease != nil {
		delete(e.lease.keys, k)
		if foreign && e.lease.onGone != nil {
			e.lease.onGone(k)
		}
	}
	s.publishLocked(service, driver.ChangeEvent(driver.Delete(id)))
}

func (s *Server) list(ctx context.Context, user, service string) ([]driver.Instance, error) {
	if err := s.enter(ctx, user, "read "+service); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	return s.listLocked(service), nil
}

// services returns the services with entries in namespace ns.
func (s *Server) services(ctx context.Context, user, ns string) ([]string, error) {
	if err := s.enter(ctx, user, "list services"); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	var out []string
	for sc, es := range s.entries {
		if len(es) == 0 {
			continue
		}
		if ns == "" && !strings.Contains(sc, "/") {
			out = append(out, sc)
		} else if svc, ok := strings.CutPrefix(sc, ns+"/"); ns != "" && ok && !strings.Contains(svc, "/") {
			out = append(out, svc)
		}
	}
	return out, nil
}

func (s *Server) listLocked(service string) []driver.Instance {
	out := make([]driver.Instance, 0, len(s.entries[service]))
	for _, e := range s.entries[service] {
		in := e.inst
		in.Metadata = maps.Clone(in.Metadata)
		out = append(out, in)
	}
	return out
}

func (s *Server) watch(ctx context.Context, user, service string) (*stream, error) {
	if err := s.enter(ctx, user, "watch "+service); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	st := &stream{s: s, service: service, notify: make(chan struct{}, 1)}
	st.queue = []driver.Event{driver.ResetEvent(s.listLocked(service))}
	st.notify <- struct{}{}
	if s.subs[service] == nil {
		s.subs[service] = map[*stream]struct{}{}
	}
	s.subs[service][st] = struct{}{}
	return st, nil
}

func (s *Server) publishLocked(service string, ev driver.Event) {
	for st := range s.subs[service] {
		st.push(ev)
	}
}

// failStreamsLocked ends every open watch with err.
func (s *Server) failStreamsLocked(err error) {
	for _, m := range s.subs {
		for st := range m {
			st.fail(err)
		}
	}
	clear(s.subs)
}

// Stop makes the server unreachable, as a stopped process is: every call
// fails at once and open watches end. Data and leases are kept.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = true
	s.failStreamsLocked(ErrDown)
}

// Start brings a stopped server back. Like etcd after a restart, every lease
// gets its full TTL again.
func (s *Server) Start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = false
	for _, l := range s.leases {
		s.arm(l)
	}
}

// Pause freezes the server as SIGSTOP freezes a process: calls block until
// Resume (or their context ends), open watches go silent and then fail as a
// client's health check would, and nothing happens on the server, no lease
// expires either. But the clock runs on: see Resume.
func (s *Server) Pause() {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.resumed:
		s.resumed = make(chan struct{})
	default:
	}
	s.failStreamsLocked(fmt.Errorf("memory: server not answering: %w", registry.ErrUnavailable))
}

// Resume ends a Pause. Like a real server that runs again (etcd's lessor
// revoking overdue leases, a Consul TTL check turning critical), it first
// expires every lease whose TTL ran out while it was paused, before it
// answers any call: the renewals that could not reach it are too late.
func (s *Server) Resume() {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.resumed:
		return
	default:
	}
	close(s.resumed)
	now := time.Now()
	for _, l := range s.leases {
		if !now.Before(l.expires) {
			s.revokeLocked(l, ErrLeaseNotFound)
		}
	}
}

// Wipe drops all data and leases, as a server restarted with an empty data
// directory. Holders of leases find out at their next keepalive.
func (s *Server) Wipe() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.leases {
		l.timer.Stop()
	}
	clear(s.leases)
	clear(s.entries)
	s.failStreamsLocked(ErrDataLost)
}

// RevokeLeases revokes every lease behind its holders' backs.
func (s *Server) RevokeLeases() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.leases {
		s.revokeLocked(l, ErrLeaseNotFound)
	}
}

// Restrict makes the server refuse every call of user but Ping with
// ErrPermissionDenied, as a real server refuses an authenticated user
// without the rights (an etcd user without a role, a Consul token without
// service rights). Clients are given a user with Options.User.
func (s *Server) Restrict(user string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.restricted[user] = true
}

// Delete removes an entry of the default namespace as another client would.
func (s *Server) Delete(service, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleteLocked(service, id, true)
}

// Put writes an entry of the default namespace with no lease, as another
// client would, overwriting what is there. It is not validated: tests use it
// to write garbage.
func (s *Server) Put(inst driver.Instance) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putLocked(inst.Service, inst, nil)
}

// Leases returns the number of live leases.
func (s *Server) Leases() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.leases)
}

// Watches returns the number of open watches.
func (s *Server) Watches() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.subs {
		n += len(m)
	}
	return n
}

// stream is an open watch: an unbounded queue, so the server never blocks on
// a slow reader and no event is dropped.
type stream struct {
	s       *Server
	service string
	notify  chan struct{}
	mu      sync.Mutex
	queue   []driver.Event
	err     error
}

func (st *stream) push(ev driver.Event) {
	st.mu.Lock()
	if st.err == nil {
		st.queue = append(st.queue, ev)
	}
	st.mu.Unlock()
	select {
	case st.notify <- struct{}{}:
	default:
	}
}

func (st *stream) fail(err error) {
	st.mu.Lock()
	if st.err == nil {
		st.err = err
	}
	st.mu.Unlock()
	select {
	case st.notify <- struct{}{}:
	default:
	}
}

func (st *stream) Next(ctx context.Context) (driver.Event, error) {
	for {
		st.mu.Lock()
		if st.err != nil {
			err := st.err
			st.mu.Unlock()
			return driver.Event{}, err
		}
		if len(st.queue) > 0 {
			ev := st.queue[0]
			st.queue = st.queue[1:]
			if !ev.Reset {
				// Hand over every queued change as one batch, in order, as a
				// network backend does with one server response (a delete
				// and re-create of one key then arrive together).
				ev.Changes = slices.Clone(ev.Changes)
				for len(st.queue) > 0 && !st.queue[0].Reset {
					ev.Changes = append(ev.Changes, st.queue[0].Changes...)
					st.queue = st.queue[1:]
				}
			}
			st.mu.Unlock()
			return ev, nil
		}
		st.mu.Unlock()
		select {
		case <-st.notify:
		case <-ctx.Done():
			return driver.Event{}, ctx.Err()
		}
	}
}

func (st *stream) Close() error {
	st.s.mu.Lock()
	delete(st.s.subs[st.service], st)
	if len(st.s.subs[st.service]) == 0 {
		delete(st.s.subs, st.service)
	}
	st.s.mu.Unlock()
	st.fail(errors.New("memory: watch closed"))
	return nil
}
