package k8s

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

var leaseSelector = LabelAppManagedBy + "=" + ManagedBy

func listOptions(selector string, limit *int64) metav1.ListOptions {
	o := metav1.ListOptions{LabelSelector: selector}
	if limit != nil {
		o.Limit = *limit
	}
	return o
}

// leaseState is what a list knows of the Leases that gate registered
// slices.
type leaseState int

const (
	leasesNone      leaseState = iota // no slice written by this package: Leases not read
	leasesListed                      // read: registered slices are gated by them
	leasesForbidden                   // RBAC forbids reading them: registered slices are taken as they are
)

// list reads the slices of a target, then, if any of them was written by
// this package, the Leases that gate them: discovering a plain Service
// needs get, list and watch on endpointslices only. A registrar creates
// its Lease before its slices, so every Lease a listed slice names was
// there before the slices were read. When RBAC forbids reading Leases the
// registered slices are taken as they are (see the package doc), with one
// warning per backend.
func (b *backend) list(ctx context.Context, selector string) (*coordinationv1.LeaseList, *discoveryv1.EndpointSliceList, leaseState, error) {
	rctx, cancel := context.WithTimeout(ctx, b.opts.RequestTimeout)
	defer cancel()
	slices, err := b.cs.DiscoveryV1().EndpointSlices(b.ns).List(rctx, listOptions(selector, nil))
	if err != nil {
		return nil, nil, leasesNone, b.wrap(ctx, "list", resSlices, err)
	}
	if !anyRegistered(slices.Items) {
		b.noteUp()
		return &coordinationv1.LeaseList{}, slices, leasesNone, nil
	}
	leases, err := b.cs.CoordinationV1().Leases(b.ns).List(rctx, listOptions(leaseSelector, nil))
	if apierrors.IsForbidden(err) {
		b.noteUp()
		b.leasesForbidden(err)
		return &coordinationv1.LeaseList{}, slices, leasesForbidden, nil
	}
	if err != nil {
		return nil, nil, leasesNone, b.wrap(ctx, "list", resLeases, err)
	}
	b.noteUp()
	return leases, slices, leasesListed, nil
}

func anyRegistered(items []discoveryv1.EndpointSlice) bool {
	for i := range items {
		if registered(&items[i]) {
			return true
		}
	}
	return false
}

// registered reports whether es was written by this package's registrars.
func registered(es *discoveryv1.EndpointSlice) bool {
	return es.Labels[LabelManagedBy] == ManagedBy && es.Labels[LabelLease] != ""
}

// leasesForbidden logs, once per backend, that registered slices are taken
// without their Leases.
func (b *backend) leasesForbidden(err error) {
	if b.leaseWarned.CompareAndSwap(false, true) {
		b.log.Warn("k8s: RBAC forbids reading Leases: instances registered by rollcall are listed as their EndpointSlices are, "+
			"without checking that their registrar still renews its Lease (a registrar that crashed stays listed until someone "+
			"allowed to collect it does); grant get, list and watch on leases.coordination.k8s.io (deploy/rbac/discovery.yaml) to check them",
			"namespace", b.ns, "err", err)
	}
}

func (b *backend) List(ctx context.Context, service string) ([]driver.Instance, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	t, err := parseTarget(service)
	if err != nil {
		return nil, err
	}
	leases, slices, state, err := b.list(ctx, t.selector())
	if err != nil {
		return nil, err
	}
	v := newView(b, t)
	return v.reset(slices.Items, leases.Items, state == leasesForbidden), nil
}

func (b *backend) Watch(ctx context.Context, service string) (driver.Stream, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	t, err := parseTarget(service)
	if err != nil {
		return nil, err
	}
	// The stream lives until Close (or the backend's end), whatever ctx,
	// which bounds only opening: it opens in the background, and its first
	// list reports an unreachable server as the stream's error.
	sctx, cancel := context.WithCancel(b.ctx)
	s := &stream{b: b, t: t, ctx: sctx, cancel: cancel, done: make(chan struct{}), notify: make(chan struct{}, 1)}
	if !b.addStream(s) {
		cancel()
		return nil, errors.New("k8s: backend closed")
	}
	go s.run()
	return s, nil
}

// addStream registers a stream and its goroutine with the backend, and
// starts the health loop if it does not run.
func (b *backend) addStream(s *stream) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.ctx.Err() != nil {
		return false
	}
	b.streams[s] = struct{}{}
	b.wg.Add(1) // the stream's goroutine
	if !b.checking {
		b.checking = true
		b.wg.Add(1)
		go b.healthLoop()
	}
	return true
}

func (b *backend) removeStream(s *stream) {
	b.mu.Lock()
	delete(b.streams, s)
	b.mu.Unlock()
}

// healthLoop checks /readyz every HealthInterval while streams are open
// (unless a watch event arrived meanwhile, over the same connection), and
// fails them all when the API server does not answer within HealthTimeout:
// a watch on a paused server is silent, not failed.
func (b *backend) healthLoop() {
	defer b.wg.Done()
	t := time.NewTicker(b.opts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			b.mu.Lock()
			b.checking = false
			b.mu.Unlock()
			return
		case <-t.C:
		}
		b.mu.Lock()
		if len(b.streams) == 0 {
			b.checking = false
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
		if time.Since(time.Unix(0, b.heard.Load())) < b.opts.HealthInterval {
			continue // a watch event just came over the same connection
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.opts.HealthTimeout)
		err := b.cs.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
		cancel()
		if err == nil {
			b.noteUp()
		}
		if err == nil || b.ctx.Err() != nil {
			continue
		}
		b.noteDown()
		err = fmt.Errorf("k8s: API server health check (/readyz, %v): %w: %w", b.opts.HealthTimeout, registry.ErrUnavailable, err)
		b.mu.Lock()
		streams := make([]*stream, 0, len(b.streams))
		for s := range b.streams {
			streams = append(streams, s)
		}
		b.mu.Unlock()
		for _, s := range streams {
			s.fail(err)
		}
	}
}

// stream is an open watch of one target: a goroutine lists and watches,
// and queues events (unbounded, so it never blocks on a slow reader).
type stream struct {
	b      *backend
	t      target
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	notify chan struct{}

	mu    sync.Mutex
	queue []driver.Event
	err   error
}

func (s *stream) push(ev driver.Event) {
	s.mu.Lock()
	if s.err == nil {
		s.queue = append(s.queue, ev)
	}
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *stream) fail(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
		s.queue = nil
	}
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *stream) Next(ctx context.Context) (driver.Event, error) {
	for {
		s.mu.Lock()
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return driver.Event{}, err
		}
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue[0] = driver.Event{}
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return ev, nil
		}
		s.mu.Unlock()
		select {
		case <-s.notify:
		case <-ctx.Done():
			return driver.Event{}, ctx.Err()
		}
	}
}

// Close stops the watch (its requests are canceled, so the server ends it)
// and waits for its goroutine.
func (s *stream) Close() error {
	s.cancel()
	<-s.done
	s.fail(errors.New("k8s: watch closed"))
	return nil
}

func (s *stream) run() {
	defer s.b.wg.Done()
	defer close(s.done)
	defer s.b.removeStream(s)
	err := s.loop()
	if s.ctx.Err() != nil {
		err = errors.New("k8s: watch closed")
	}
	s.fail(err)
}

// errRelist ends a watch that must be relisted: the server ended it, or
// its resource version is too old (410 Gone).
var errRelist = errors.New("k8s: relist")

// errNeedLeases ends a watch without Leases when a registered slice
// appears: the stream lists again, Leases too.
var errNeedLeases = errors.New("k8s: a registered slice appeared; listing its Leases")

func (s *stream) loop() error {
	v := newView(s.b, s.t)
	for {
		leases, slices, state, err := s.b.list(s.ctx, s.t.selector())
		if err != nil {
			return err
		}
		if state == leasesListed {
			for i := range slices.Items {
				s.collectOrphan(&slices.Items[i], leases)
			}
		}
		s.push(driver.ResetEvent(v.reset(slices.Items, leases.Items, state == leasesForbidden)))
		start := time.Now()
		leaseRV := leases.ResourceVersion
		if state != leasesListed {
			leaseRV = "" // no Lease watch
		}
		err = s.watch(v, slices.ResourceVersion, leaseRV, state)
		if errors.Is(err, errNeedLeases) {
			continue
		}
		if !errors.Is(err, errRelist) {
			return err
		}
		if time.Since(start) < time.Second {
			return fmt.Errorf("k8s: watch of %s ended at once: %w", s.t.name, err)
		}
	}
}

// watch follows the slices and, if they were listed (state), the Leases
// from the listed resource versions until the watch must be relisted or
// fails.
func (s *stream) watch(v *view, sliceRV, leaseRV string, state leaseState) error {
	b := s.b
	// The server ends each watch after Resync (jittered), and the stream
	// relists then.
	secs := int64(b.opts.Resync.Seconds() * (0.8 + 0.2*rand.Float64()))
	secs = max(secs, 1)
	sw, err := b.cs.DiscoveryV1().EndpointSlices(b.ns).Watch(s.ctx, metav1.ListOptions{
		LabelSelector: s.t.selector(), ResourceVersion: sliceRV, AllowWatchBookmarks: true, TimeoutSeconds: &secs,
	})
	if err != nil {
		return b.wrap(s.ctx, "watch", resSlices, err)
	}
	defer sw.Stop()
	var leaseEvents <-chan watch.Event // nil: no Lease watch
	if state == leasesListed {
		lw, err := b.cs.CoordinationV1().Leases(b.ns).Watch(s.ctx, metav1.ListOptions{
			LabelSelector: leaseSelector, ResourceVersion: leaseRV, AllowWatchBookmarks: true, TimeoutSeconds: &secs,
		})
		if apierrors.IsForbidden(err) { // list allowed, watch not: as if both were forbidden
			b.leasesForbidden(err)
			v.blind = true
			keys := make([]string, 0, len(v.byKey))
			for k := range v.byKey {
				keys = append(keys, k)
			}
			s.pushChanges(v.recompute(keys))
			state = leasesForbidden
		} else if err != nil {
			return b.wrap(s.ctx, "watch", resLeases, err)
		} else {
			defer lw.Stop()
			leaseEvents = lw.ResultChan()
		}
	}

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		_, next := v.due(time.Now())
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		} else {
			timer.Stop()
		}
		var keys []string
		select {
		case <-s.ctx.Done():
			return s.ctx.Err()
		case ev, ok := <-sw.ResultChan():
			if !ok {
				return errRelist
			}
			b.heard.Store(time.Now().UnixNano())
			switch ev.Type {
			case watch.Added, watch.Modified:
				if es, ok := ev.Object.(*discoveryv1.EndpointSlice); ok {
					if state == leasesNone && registered(es) {
						return errNeedLeases
					}
					keys = v.setSlice(es)
				}
			case watch.Deleted:
				if es, ok := ev.Object.(*discoveryv1.EndpointSlice); ok {
					keys = v.deleteSlice(es.Name)
				}
			case watch.Error:
				return s.watchError("endpointslices", ev.Object)
			}
		case ev, ok := <-leaseEvents:
			if !ok {
				return errRelist
			}
			b.heard.Store(time.Now().UnixNano())
			switch ev.Type {
			case watch.Added, watch.Modified:
				if l, ok := ev.Object.(*coordinationv1.Lease); ok {
					keys = v.setLease(l, false)
				}
			case watch.Deleted:
				if l, ok := ev.Object.(*coordinationv1.Lease); ok {
					keys = v.deleteLease(l.Name)
					s.b.collect(l.Name, "")
				}
			case watch.Error:
				return s.watchError("leases", ev.Object)
			}
		case <-timer.C:
			keys, err = s.expire(v)
			if err != nil {
				return err
			}
		}
		s.pushChanges(v.recompute(keys))
	}
}

// pushChanges delivers what recompute changed, if anything: each key once,
// at its final state (the order does not matter).
func (s *stream) pushChanges(ups []driver.Instance, dels []string) {
	if len(ups)+len(dels) == 0 {
		return
	}
	cs := make([]driver.Change, 0, len(ups)+len(dels))
	for _, in := range ups {
		cs = append(cs, driver.Put(in))
	}
	for _, id := range dels {
		cs = append(cs, driver.Delete(id))
	}
	s.push(driver.ChangeEvent(cs...))
}

func (s *stream) watchError(what string, obj any) error {
	var err error
	if st, ok := obj.(*metav1.Status); ok {
		err = apierrors.FromObject(st)
	} else {
		err = fmt.Errorf("unexpected watch error object %T", obj)
	}
	if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
		return fmt.Errorf("%w: %s: %w", errRelist, what, err)
	}
	resource := resSlices
	if what == "leases" {
		resource = resLeases
	}
	return s.b.wrap(s.ctx, "watch", resource, fmt.Errorf("watch of %s ended with an error: %w", what, err))
}

// expire reads again the Leases whose deadline has passed, and drops the
// instances of those that are still expired (or gone). A read that fails
// fails the stream: the instances are not dropped on a watch that may be
// stalled.
func (s *stream) expire(v *view) ([]string, error) {
	due, _ := v.due(time.Now())
	var keys []string
	for _, name := range due {
		ctx, cancel := context.WithTimeout(s.ctx, s.b.opts.RequestTimeout)
		l, err := s.b.cs.CoordinationV1().Leases(s.b.ns).Get(ctx, name, metav1.GetOptions{})
		cancel()
		switch {
		case apierrors.IsNotFound(err):
			keys = append(keys, v.deleteLease(name)...)
			s.b.collect(name, "")
		case err != nil:
			return nil, s.b.wrap(s.ctx, "get", resLeases, err)
		default:
			s.b.noteUp()
			keys = append(keys, v.setLease(l, true)...)
			if r := v.leases[name]; r != nil && r.dead {
				s.b.log.Info("k8s: lease expired", "lease", name, "renewed", r.renew, "duration", r.dur)
				s.b.collect(name, r.uid)
			}
		}
	}
	return keys, nil
}

// collectOrphan garbage-collects a listed slice written by this package
// whose Lease is not in the listed Leases or is expired.
func (s *stream) collectOrphan(es *discoveryv1.EndpointSlice, leases *coordinationv1.LeaseList) {
	if es.Labels[LabelManagedBy] != ManagedBy {
		return
	}
	name := es.Labels[LabelLease]
	if name == "" {
		return
	}
	for i := range leases.Items {
		if leases.Items[i].Name == name {
			l := &leases.Items[i]
			if time.Now().After(s.b.deadline(leaseRecOf(l))) {
				s.b.collect(name, l.UID)
			}
			return
		}
	}
	s.b.collect(name, "")
}

// collect deletes, in the background, an expired Lease (uid given) or the
// slices of a Lease that is gone (uid empty), after reading the Lease again.
// It is best effort: a refusal by RBAC is logged once, other failures are
// left for the next discoverer.
func (b *backend) collect(lease string, uid types.UID) {
	b.mu.Lock()
	if b.gcBusy[lease] || b.gcBusy[""] { // "" marks a refusal by RBAC
		b.mu.Unlock()
		return
	}
	b.gcBusy[lease] = true
	b.mu.Unlock()
	ok := b.goFunc(func() {
		defer func() {
			b.mu.Lock()
			delete(b.gcBusy, lease)
			b.mu.Unlock()
		}()
		ctx, cancel := context.WithTimeout(b.ctx, 2*b.opts.RequestTimeout)
		defer cancel()
		if err := b.collectLease(ctx, lease, uid); err != nil {
			var fe *ForbiddenError
			if errors.As(err, &fe) {
				b.mu.Lock()
				b.gcBusy[""] = true
				b.mu.Unlock()
				b.log.Info("k8s: not allowed to clean up expired registrations; leaving them", "err", err)
				return
			}
			b.log.Debug("k8s: cleaning up an expired registration failed", "lease", lease, "err", err)
		}
	})
	if !ok {
		b.mu.Lock()
		delete(b.gcBusy, lease)
		b.mu.Unlock()
	}
}

func (b *backend) collectLease(ctx context.Context, name string, uid types.UID) error {
	api := b.cs.CoordinationV1().Leases(b.ns)
	l, err := api.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return b.wrap(ctx, "get", resLeases, err)
	default:
		b.noteUp()
		if uid == "" || l.UID != uid || !time.Now().After(b.deadline(leaseRecOf(l))) {
			return nil // there, or renewed, or replaced
		}
		rv := l.ResourceVersion
		err := api.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid, ResourceVersion: &rv}})
		if apierrors.IsConflict(err) {
			return nil // renewed meanwhile
		}
		if err != nil && !apierrors.IsNotFound(err) {
			return b.wrap(ctx, "delete", resLeases, err)
		}
		b.log.Info("k8s: deleted expired lease", "lease", name)
	}
	list, err := b.listSliceMeta(ctx, LabelLease+"="+name)
	if err != nil {
		return b.wrap(ctx, "list", resSlices, err)
	}
	for _, m := range list {
		if err := b.deleteSlice(ctx, m.Name, m.UID); err != nil {
			return err
		}
	}
	return nil
}
