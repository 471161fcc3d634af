package k8s

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// session is one Lease and its renewal loop; every publication of a backend
// is tied to it.
type session struct {
	driver.Loss
	name string
	uid  types.UID
}

func (b *backend) leaseSeconds() int32 {
	return int32(max(1, math.Ceil(b.opts.TTL.Seconds())))
}

func randomHex(n int) string {
	buf := make([]byte, n)
	_, _ = rand.Read(buf) // never fails
	return hex.EncodeToString(buf)
}

// attach ties p to the live session, creating a Lease if needed, and
// records p as the publication of its instance; it returns the publication
// p replaces, if any. Both happen under sessMu, so that the withdrawal of
// the session's last other publication (releaseIfUnused) cannot delete the
// Lease in between.
func (b *backend) attach(ctx context.Context, p *publication) (old *publication, err error) {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	ss, err := b.session(ctx)
	if err != nil {
		return nil, err
	}
	p.sess = ss
	b.mu.Lock()
	old = b.pubs[p.key]
	b.pubs[p.key] = p
	b.mu.Unlock()
	return old, nil
}

// session returns the live session, creating a Lease if needed. sessMu is
// held.
func (b *backend) session(ctx context.Context) (*session, error) {
	b.mu.Lock()
	cur, crashed, closed := b.sess, b.crashed, b.closed
	b.mu.Unlock()
	switch {
	case crashed:
		return nil, errCrashed
	case closed:
		return nil, errors.New("k8s: backend closed")
	case cur != nil && !cur.IsLost():
		return cur, nil
	}
	now := metav1.NowMicro()
	secs := b.leaseSeconds()
	l := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{
			Name:   "rollcall-" + dnsLabelish(b.opts.Identity, 30) + "-" + randomHex(5),
			Labels: map[string]string{LabelAppManagedBy: ManagedBy},
		},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity:       &b.opts.Identity,
			LeaseDurationSeconds: &secs,
			AcquireTime:          &now,
			RenewTime:            &now,
		},
	}
	created, err := b.cs.CoordinationV1().Leases(b.ns).Create(ctx, l, metav1.CreateOptions{})
	if err != nil {
		return nil, b.wrap(ctx, "create", resLeases, err)
	}
	b.noteUp()
	ss := &session{name: created.Name, uid: created.UID}
	b.mu.Lock()
	b.sess = ss
	b.mu.Unlock()
	if !b.goFunc(func() { b.keepAlive(ss) }) {
		ss.Lose(errors.New("k8s: backend closed"))
		return nil, errors.New("k8s: backend closed")
	}
	b.log.Debug("k8s: lease created", "lease", ss.name)
	b.goFunc(b.sweep)
	return ss, nil
}

// sweep garbage-collects the expired Leases of the namespace (and their
// slices): registrars do it when they create their Lease and every 100
// renewals, so that expired registrations do not pile up where no watcher
// runs.
func (b *backend) sweep() {
	ctx, cancel := context.WithTimeout(b.ctx, b.opts.RequestTimeout)
	defer cancel()
	list, err := b.cs.CoordinationV1().Leases(b.ns).List(ctx, listOptions(leaseSelector, nil))
	if err != nil {
		return
	}
	now := time.Now()
	for i := range list.Items {
		l := &list.Items[i]
		if now.After(b.deadline(leaseRecOf(l))) {
			b.collect(l.Name, l.UID)
		}
	}
}

// loseSession marks the session and every publication on it lost.
func (b *backend) loseSession(ss *session, err error) {
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
	b.log.Warn("k8s: lease lost", "lease", ss.name, "err", err)
}

// keepAlive renews the Lease every TTL/3 and checks that the slices of its
// publications are still there. While the API server does not answer it
// keeps trying; once the server says the Lease is gone, the session is lost.
func (b *backend) keepAlive(ss *session) {
	period := b.opts.TTL / 3
	t := time.NewTicker(period)
	defer t.Stop()
	failing := 0
	for n := 1; ; n++ {
		select {
		case <-b.ctx.Done():
			return
		case <-ss.Lost():
			return
		case <-t.C:
		}
		if n%100 == 0 {
			b.goFunc(b.sweep)
		}
		ctx, cancel := context.WithTimeout(b.ctx, max(period, 500*time.Millisecond))
		err := b.renew(ctx, ss)
		if err == nil {
			err = b.checkSlices(ctx, ss)
		}
		cancel()
		switch {
		case err == nil:
			if failing > 0 {
				b.log.Info("k8s: lease renewed again", "lease", ss.name, "failed", failing)
			}
			failing = 0
		case errors.Is(err, ErrLeaseGone):
			b.loseSession(ss, err)
			return
		case b.ctx.Err() != nil:
			return
		default:
			// The first failure of a run is a warning, the others are
			// the same news.
			lvl := slog.LevelWarn
			if failing > 0 {
				lvl = slog.LevelDebug
			}
			failing++
			b.log.Log(b.ctx, lvl, "k8s: lease renewal failed; retrying", "lease", ss.name, "err", err)
		}
	}
}

// renew moves the Lease's renewTime to now, if it still has our UID.
func (b *backend) renew(ctx context.Context, ss *session) error {
	patch, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": ss.uid},
		"spec":     map[string]any{"renewTime": metav1.NowMicro()},
	})
	_, err := b.cs.CoordinationV1().Leases(b.ns).Patch(ctx, ss.name, types.MergePatchType, patch, metav1.PatchOptions{})
	switch {
	case err == nil:
		b.noteUp()
		return nil
	case apierrors.IsNotFound(err), apierrors.IsConflict(err):
		// Conflict: the UID precondition failed, the Lease was recreated.
		return fmt.Errorf("%w: %s: %w", ErrLeaseGone, ss.name, err)
	}
	return b.wrap(ctx, "patch", resLeases, err)
}

// checkSlices lists the slices tied to the session's Lease, and loses the
// publications whose slice is gone or was replaced.
func (b *backend) checkSlices(ctx context.Context, ss *session) error {
	start := time.Now()
	list, err := b.listSliceMeta(ctx, LabelLease+"="+ss.name)
	if err != nil {
		return b.wrap(ctx, "list", resSlices, err)
	}
	have := make(map[string]types.UID, len(list))
	for _, m := range list {
		have[m.Name] = m.UID
	}
	b.mu.Lock()
	var gone []*publication
	for _, p := range b.pubs {
		if p.sess != ss {
			continue
		}
		name, uid, at := p.current()
		if at.Before(start) && have[name] != uid {
			gone = append(gone, p)
		}
	}
	b.mu.Unlock()
	for _, p := range gone {
		p.Lose(fmt.Errorf("%w: %s", ErrSliceGone, p.key[0]+"/"+p.key[1]))
	}
	return nil
}

// listSliceMeta lists the metadata only of the slices matching a label
// selector, consistently (from etcd or an up-to-date cache).
func (b *backend) listSliceMeta(ctx context.Context, selector string) ([]metav1.PartialObjectMetadata, error) {
	raw, err := b.cs.DiscoveryV1().RESTClient().Get().
		Namespace(b.ns).Resource("endpointslices").
		Param("labelSelector", selector).
		SetHeader("Accept", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1").
		DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	var list metav1.PartialObjectMetadataList
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("k8s: decoding slice list: %w", err)
	}
	return list.Items, nil
}

// revoke deletes the session's Lease, then the slices still tied to it. The
// Lease goes first: its deletion alone makes every slice tied to it no
// instance, for every discoverer at once (and hands the slices to the
// garbage collector, and to the watchers that find them). It is safe to
// repeat: what is gone already counts as deleted.
func (b *backend) revoke(ctx context.Context, ss *session) error {
	ss.Lose(errors.New("k8s: closed"))
	uid := ss.uid
	err := b.cs.CoordinationV1().Leases(b.ns).Delete(ctx, ss.name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return b.wrap(ctx, "delete", resLeases, err)
	}
	list, err := b.listSliceMeta(ctx, LabelLease+"="+ss.name)
	if err != nil {
		return b.wrap(ctx, "list", resSlices, err)
	}
	var errs []error
	for _, m := range list {
		if err := b.deleteSlice(ctx, m.Name, m.UID); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (b *backend) deleteSlice(ctx context.Context, name string, uid types.UID) error {
	var pre *metav1.Preconditions
	if uid != "" {
		pre = &metav1.Preconditions{UID: &uid}
	}
	err := b.cs.DiscoveryV1().EndpointSlices(b.ns).Delete(ctx, name, metav1.DeleteOptions{Preconditions: pre})
	if err == nil || apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return b.wrap(ctx, "delete", resSlices, err)
}

// buildSlice makes the EndpointSlice of one registered instance.
func (b *backend) buildSlice(t target, inst driver.Instance, ss *session) (*discoveryv1.EndpointSlice, error) {
	host, portStr, err := net.SplitHostPort(inst.Addr)
	if err != nil {
		return nil, badName("address %q is not host:port", inst.Addr)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return nil, badName("address %q: bad port", inst.Addr)
	}
	if t.portNum != 0 && int(t.portNum) != port {
		return nil, badName("service name %q selects port %d, but the address %q has port %d", t.name, t.portNum, inst.Addr, port)
	}
	addrType := discoveryv1.AddressTypeFQDN
	if ip, err := netip.ParseAddr(host); err == nil {
		ip = ip.Unmap()
		special := ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified()
		switch {
		case ip.Zone() != "":
			return nil, badName("address %q: zoned IPv6 addresses cannot be registered", inst.Addr)
		case ip.Is4() && special:
			// Refused in an IPv4 slice; valid as a name in an FQDN slice.
			addrType = discoveryv1.AddressTypeFQDN
		case ip.Is4():
			addrType = discoveryv1.AddressTypeIPv4
		case special:
			return nil, badName("address %q: Kubernetes refuses loopback, link-local and unspecified IPv6 addresses", inst.Addr)
		default:
			addrType = discoveryv1.AddressTypeIPv6
		}
		host = ip.String()
	} else if errs := validation.IsDNS1123Subdomain(host); len(errs) > 0 {
		return nil, badName("address %q: host is not a DNS name Kubernetes accepts: %s", inst.Addr, errs[0])
	}
	md := "{}"
	if len(inst.Metadata) > 0 {
		buf, err := json.Marshal(inst.Metadata)
		if err != nil {
			return nil, badName("metadata: %v", err)
		}
		md = string(buf)
	}
	yes, no := true, false
	tcp := corev1.ProtocolTCP
	p32 := int32(port)
	portName := t.portName
	ep := discoveryv1.Endpoint{
		Addresses:  []string{host},
		Conditions: discoveryv1.EndpointConditions{Ready: &yes, Serving: &yes, Terminating: &no},
	}
	if z := inst.Metadata["zone"]; z != "" && len(validation.IsValidLabelValue(z)) == 0 {
		ep.Zone = &z
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: sliceName(ss.name, inst.Service, inst.ID),
			Labels: map[string]string{
				LabelServiceName: t.service,
				LabelManagedBy:   ManagedBy,
				LabelLease:       ss.name,
				LabelInstance:    instanceLabel(inst.Service, inst.ID),
			},
			Annotations: map[string]string{
				AnnotationService:  inst.Service,
				AnnotationID:       inst.ID,
				AnnotationMetadata: md,
			},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "coordination.k8s.io/v1",
				Kind:       "Lease",
				Name:       ss.name,
				UID:        ss.uid,
			}},
		},
		AddressType: addrType,
		Endpoints:   []discoveryv1.Endpoint{ep},
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &p32, Protocol: &tcp}},
	}, nil
}

// Publish writes the instance's slice, tied to the backend's Lease. An ID
// held by another live Lease at another address is refused with
// registry.ErrConflict, before anything is written (so a refused
// registrar holds no Lease) and again after the write, for two
// registrations racing: of two slices of one ID at different addresses,
// the older one (creation time, then name) stands and the other is
// deleted. The same address under another Lease is the same endpoint (a
// restarted process): both slices stand, and discovery shows one instance.
func (b *backend) Publish(ctx context.Context, inst driver.Instance) (driver.Publication, error) {
	t, err := parseTarget(inst.Service)
	if err != nil {
		return nil, err
	}
	probe, err := b.buildSlice(t, inst, &session{}) // validates; the endpoint as it will be written
	if err != nil {
		return nil, err
	}
	if err := b.conflict(ctx, probe, b.leaseName(), nil); err != nil {
		return nil, err
	}
	p := &publication{b: b, key: [2]string{inst.Service, inst.ID}, t: t}
	old, err := b.attach(ctx, p)
	if err != nil {
		return nil, err
	}
	ss := p.sess
	es, err := b.buildSlice(t, inst, ss)
	if err != nil {
		b.forget(p)
		_ = b.releaseIfUnused(ctx, ss)
		return nil, err
	}
	if old != nil {
		old.Lose(errors.New("k8s: replaced by a newer registration"))
		if name, uid, _ := old.current(); old.sess != ss && name != "" {
			// A lost registration's slice, tied to a Lease that is gone:
			// nobody else may clean it up where no watcher runs.
			b.goFunc(func() {
				ctx, cancel := context.WithTimeout(b.ctx, b.opts.RequestTimeout)
				defer cancel()
				_ = b.deleteSlice(ctx, name, uid)
			})
		}
	}
	written, err := b.writeSlice(ctx, es, nil)
	if err != nil {
		b.forget(p)
		return nil, err
	}
	if err := b.conflict(ctx, written, ss.name, written); errors.Is(err, registry.ErrConflict) {
		// Another registrar wrote this ID at another address first.
		b.forget(p)
		p.Lose(err)
		if derr := b.deleteSlice(ctx, written.Name, written.UID); derr != nil {
			b.log.Warn("k8s: deleting the slice of a refused duplicate registration failed", "slice", written.Name, "err", derr)
		}
		_ = b.releaseIfUnused(ctx, ss)
		return nil, err
	}
	p.set(written)
	if ss.IsLost() { // lost while we were publishing
		p.Lose(ss.Err())
	}
	return p, nil
}

// leaseName is the name of the backend's live Lease, "" if it has none.
func (b *backend) leaseName() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sess == nil || b.sess.IsLost() {
		return ""
	}
	return b.sess.name
}

// conflict returns an error wrapping registry.ErrConflict when a slice of
// es's instance (same service name and ID) at another address is tied to a
// live Lease other than own; with mine set (our slice as written), only a
// slice older than mine counts.
func (b *backend) conflict(ctx context.Context, es *discoveryv1.EndpointSlice, own string, mine *discoveryv1.EndpointSlice) error {
	service, id := es.Annotations[AnnotationService], es.Annotations[AnnotationID]
	list, err := b.cs.DiscoveryV1().EndpointSlices(b.ns).List(ctx, listOptions(LabelInstance+"="+es.Labels[LabelInstance], nil))
	if err != nil {
		return b.wrap(ctx, "list", resSlices, err)
	}
	for i := range list.Items {
		o := &list.Items[i]
		lease := o.Labels[LabelLease]
		if lease == "" || lease == own || o.Annotations[AnnotationService] != service || o.Annotations[AnnotationID] != id ||
			sameEndpoint(o, es) || (mine != nil && !olderSlice(o, mine)) {
			continue
		}
		var owner types.UID
		for _, ref := range o.OwnerReferences {
			if ref.Kind == "Lease" && ref.Name == lease {
				owner = ref.UID
			}
		}
		l, err := b.cs.CoordinationV1().Leases(b.ns).Get(ctx, lease, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return b.wrap(ctx, "get", resLeases, err)
		}
		// The holder's own claim decides, with no grace: a process
		// restarted with the IDs of its crashed predecessor takes them
		// back at once. Nothing is deleted on this judgment.
		if r := leaseRecOf(l); (owner != "" && owner != l.UID) || time.Now().After(b.claimEnd(r.renew, r)) {
			continue // that registration is dead
		}
		holder := ""
		if l.Spec.HolderIdentity != nil {
			holder = *l.Spec.HolderIdentity
		}
		return fmt.Errorf("%w: k8s: %s/%s is registered at %s by another live registrar (lease %s, holder %q)",
			registry.ErrConflict, service, id, endpointAddr(o), lease, holder)
	}
	return nil
}

// sameEndpoint reports whether two slices of this package hold the same
// address and port.
func sameEndpoint(a, b *discoveryv1.EndpointSlice) bool {
	return endpointAddr(a) == endpointAddr(b)
}

// endpointAddr is the host:port of a slice written by this package.
func endpointAddr(es *discoveryv1.EndpointSlice) string {
	host, port := "", ""
	if len(es.Endpoints) > 0 && len(es.Endpoints[0].Addresses) > 0 {
		host = es.Endpoints[0].Addresses[0]
	}
	if len(es.Ports) > 0 && es.Ports[0].Port != nil {
		port = strconv.Itoa(int(*es.Ports[0].Port))
	}
	return net.JoinHostPort(host, port)
}

// olderSlice orders slices by creation: of two registrations of one ID
// racing, the older slice stands. creationTimestamp has whole seconds; within
// one second the order is the resource versions' (the API server's etcd
// revisions, increasing with every write), then the names. Ordering ties by
// name alone let both stand: the slice created first checked before the
// other existed, and the other, first by name, counted itself older.
func olderSlice(a, b *discoveryv1.EndpointSlice) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	}
	ra, errA := strconv.ParseUint(a.ResourceVersion, 10, 64)
	rb, errB := strconv.ParseUint(b.ResourceVersion, 10, 64)
	if errA == nil && errB == nil && ra != rb {
		return ra < rb
	}
	return a.Name < b.Name
}

// writeSlice creates es, or overwrites the slice of that name if it exists
// (cur, if known, is what we last wrote). It returns the stored slice.
func (b *backend) writeSlice(ctx context.Context, es *discoveryv1.EndpointSlice, cur *discoveryv1.EndpointSlice) (*discoveryv1.EndpointSlice, error) {
	api := b.cs.DiscoveryV1().EndpointSlices(b.ns)
	if cur == nil {
		created, err := api.Create(ctx, es, metav1.CreateOptions{})
		if err == nil {
			b.noteUp()
			return created, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, b.wrap(ctx, "create", resSlices, err)
		}
	}
	for attempt := 0; ; attempt++ {
		if cur == nil {
			got, err := api.Get(ctx, es.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				created, err := api.Create(ctx, es, metav1.CreateOptions{})
				if err != nil {
					return nil, b.wrap(ctx, "create", resSlices, err)
				}
				return created, nil
			}
			if err != nil {
				return nil, b.wrap(ctx, "get", resSlices, err)
			}
			cur = got
		}
		if cur.AddressType != es.AddressType {
			// addressType is immutable: replace the slice.
			if err := b.deleteSlice(ctx, cur.Name, cur.UID); err != nil {
				return nil, err
			}
			created, err := api.Create(ctx, es, metav1.CreateOptions{})
			if err != nil {
				return nil, b.wrap(ctx, "create", resSlices, err)
			}
			return created, nil
		}
		upd := es.DeepCopy()
		upd.ResourceVersion = cur.ResourceVersion
		upd.UID = cur.UID
		stored, err := api.Update(ctx, upd, metav1.UpdateOptions{})
		if err == nil {
			b.noteUp()
			return stored, nil
		}
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: %s: %w", ErrSliceGone, es.Name, err)
		}
		if !apierrors.IsConflict(err) || attempt >= 5 {
			return nil, b.wrap(ctx, "update", resSlices, err)
		}
		cur = nil // changed by someone else: read it again
	}
}

func (b *backend) forget(p *publication) (replaced bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pubs[p.key] == p {
		delete(b.pubs, p.key)
		return false
	}
	return true
}

// publication is one registered instance: one EndpointSlice.
type publication struct {
	driver.Loss // Lost and Err
	b           *backend
	key         [2]string // service, ID
	t           target
	sess        *session

	mu      sync.Mutex
	slice   *discoveryv1.EndpointSlice // as last written
	at      time.Time                  // when it was last written
	writing int                        // writes in flight
}

func (p *publication) set(es *discoveryv1.EndpointSlice) {
	p.mu.Lock()
	if es != nil {
		p.slice, p.at = es, time.Now()
	}
	p.mu.Unlock()
}

// current returns the name and UID of the slice, and when it was written.
func (p *publication) current() (string, types.UID, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.slice == nil || p.writing > 0 {
		return "", "", time.Now() // being written: not checked
	}
	return p.slice.Name, p.slice.UID, p.at
}

func (p *publication) Update(ctx context.Context, inst driver.Instance) error {
	if p.b.isCrashed() {
		return errCrashed
	}
	es, err := p.b.buildSlice(p.t, inst, p.sess)
	if err != nil {
		return err
	}
	p.mu.Lock()
	cur := p.slice
	p.writing++
	p.mu.Unlock()
	stored, err := p.b.writeSlice(ctx, es, cur)
	p.mu.Lock()
	p.writing--
	if err == nil {
		p.slice, p.at = stored, time.Now()
	}
	p.mu.Unlock()
	if errors.Is(err, ErrSliceGone) {
		p.Lose(err)
	}
	return err
}

// Withdraw deletes the slice, unless a newer publication of the same
// instance on the same Lease has taken it over (same name).
func (p *publication) Withdraw(ctx context.Context) error {
	p.b.forget(p)
	p.Lose(errors.New("k8s: withdrawn"))
	if p.b.isCrashed() {
		return errCrashed
	}
	name, uid, _ := p.current()
	if name == "" {
		return p.b.releaseIfUnused(ctx, p.sess)
	}
	p.b.mu.Lock()
	cur := p.b.pubs[p.key]
	p.b.mu.Unlock()
	if cur != nil && cur.sess == p.sess {
		return nil
	}
	// The UID precondition spares a slice of the same name written since.
	if err := p.b.deleteSlice(ctx, name, uid); err != nil {
		return err
	}
	return p.b.releaseIfUnused(ctx, p.sess)
}

// releaseIfUnused deletes the session's Lease once no publication uses it,
// so that a Registry holding no registration renews nothing; the next
// Publish creates a new Lease. A session taken out of use is retiring until
// its Lease and slices are deleted: a failed deletion is tried again by the
// next call (the shared layer repeats a failed Withdraw) and by Close, and
// until then the call fails, so that no Lease is left behind.
func (b *backend) releaseIfUnused(ctx context.Context, ss *session) error {
	b.sessMu.Lock() // no session handed out meanwhile
	b.mu.Lock()
	inUse := false
	for _, q := range b.pubs {
		if q.sess == ss {
			inUse = true
			break
		}
	}
	if !inUse && b.sess == ss && !b.crashed && !b.closed {
		b.sess = nil
		b.retiring[ss] = struct{}{}
	}
	_, retire := b.retiring[ss]
	retire = retire && !inUse
	b.mu.Unlock()
	b.sessMu.Unlock()
	if !retire {
		return nil
	}
	b.log.Debug("k8s: no registrations left; deleting the lease", "lease", ss.name)
	if err := b.revoke(ctx, ss); err != nil {
		return err
	}
	b.mu.Lock()
	delete(b.retiring, ss)
	b.mu.Unlock()
	return nil
}
