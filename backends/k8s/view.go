package k8s

import (
	"encoding/json"
	"maps"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// cand is one instance one slice offers for a target.
type cand struct {
	key      string // the instance's ID
	inst     driver.Instance
	ready    bool
	fallback bool // not ready, but serving and terminating
	lease    string
	leaseUID types.UID
	created  time.Time
	slice    string
}

// better reports whether c should be used rather than o for the same key:
// the copy in the newest slice, then the first slice by name.
func (c *cand) better(o *cand) bool {
	if o == nil {
		return true
	}
	if !c.created.Equal(o.created) {
		return c.created.After(o.created)
	}
	return c.slice < o.slice
}

// leaseRec is what a view knows of a Lease.
type leaseRec struct {
	uid   types.UID
	renew time.Time
	dur   time.Duration
	rv    string
	// dead: expired, as confirmed by a fresh read (a list or a get). Watch
	// events may bring a Lease back to life, never kill it: that is done by
	// the expiry timer after it reads the Lease again.
	dead bool
}

func leaseRecOf(l *coordinationv1.Lease) *leaseRec {
	r := &leaseRec{uid: l.UID, rv: l.ResourceVersion, renew: l.CreationTimestamp.Time}
	if l.Spec.RenewTime != nil {
		r.renew = l.Spec.RenewTime.Time
	} else if l.Spec.AcquireTime != nil {
		r.renew = l.Spec.AcquireTime.Time
	}
	if l.Spec.LeaseDurationSeconds != nil {
		r.dur = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	}
	return r
}

// view merges the slices of one target, gated by the Leases of the slices
// written by this package, into the instances a stream has delivered.
type view struct {
	b *backend
	t target

	slices      map[string][]*cand             // slice name → its candidates
	sliceLease  map[string]string              // slice name → its Lease, if written by this package
	byKey       map[string]map[string]*cand    // key → slice name → candidate
	leases      map[string]*leaseRec           // Lease name → record
	leaseSlices map[string]map[string]struct{} // Lease name → slices tied to it
	ready       map[string]struct{}            // keys with a visible ready candidate
	fallback    bool                           // no ready endpoint: use serving, terminating ones
	blind       bool                           // RBAC forbids reading Leases: registered slices count as they are
	out         map[string]driver.Instance     // what was delivered
}

func newView(b *backend, t target) *view {
	return &view{b: b, t: t,
		slices: map[string][]*cand{}, sliceLease: map[string]string{}, byKey: map[string]map[string]*cand{},
		leases: map[string]*leaseRec{}, leaseSlices: map[string]map[string]struct{}{},
		ready: map[string]struct{}{}, out: map[string]driver.Instance{}, fallback: true}
}

// deadline is when a Lease counts as expired for this client: its
// renewTime, or if later the start of this client's unbroken contact with
// the API server (see noteUp), plus its duration plus the clock-skew
// allowance. So a Lease expires only once this client has seen the server
// up, and the Lease unrenewed, for a full duration and allowance.
func (b *backend) deadline(r *leaseRec) time.Time {
	base := r.renew
	if g := b.graceBase(); g.After(base) {
		base = g
	}
	return b.claimEnd(base, r)
}

// claimEnd is when a Lease renewed at base stops being valid: its duration
// plus the clock-skew allowance later.
func (b *backend) claimEnd(base time.Time, r *leaseRec) time.Time {
	return base.Add(r.dur + b.opts.ClockSkew)
}

func (v *view) deadline(r *leaseRec) time.Time { return v.b.deadline(r) }

func (v *view) visible(c *cand) bool {
	if c.lease == "" || v.blind {
		return true
	}
	r := v.leases[c.lease]
	return r != nil && !r.dead && (c.leaseUID == "" || c.leaseUID == r.uid)
}

// reset replaces everything with a fresh list and returns the instances.
func (v *view) reset(slices []discoveryv1.EndpointSlice, leases []coordinationv1.Lease, blind bool) []driver.Instance {
	now := time.Now()
	fresh := newView(v.b, v.t)
	*v = *fresh
	v.blind = blind
	for i := range leases {
		r := leaseRecOf(&leases[i])
		r.dead = now.After(v.deadline(r))
		v.leases[leases[i].Name] = r
	}
	for i := range slices {
		v.setSlice(&slices[i])
	}
	keys := make([]string, 0, len(v.byKey))
	for k := range v.byKey {
		keys = append(keys, k)
	}
	v.recompute(keys)
	return v.instances()
}

func (v *view) instances() []driver.Instance {
	out := make([]driver.Instance, 0, len(v.out))
	for _, in := range v.out {
		in.Metadata = maps.Clone(in.Metadata)
		out = append(out, in)
	}
	return out
}

// setSlice replaces what a slice offers; it returns the keys affected.
func (v *view) setSlice(es *discoveryv1.EndpointSlice) []string {
	keys := v.deleteSlice(es.Name)
	cands := v.b.candidates(v.t, es)
	kept := cands[:0]
	for _, c := range cands {
		m := v.byKey[c.key]
		if m == nil {
			m = map[string]*cand{}
			v.byKey[c.key] = m
		}
		if _, dup := m[es.Name]; dup {
			continue // the same instance twice in one slice: the first counts
		}
		m[es.Name] = c
		kept = append(kept, c)
		keys = append(keys, c.key)
	}
	v.slices[es.Name] = kept
	if lease := es.Labels[LabelLease]; lease != "" && es.Labels[LabelManagedBy] == ManagedBy {
		if v.leaseSlices[lease] == nil {
			v.leaseSlices[lease] = map[string]struct{}{}
		}
		v.leaseSlices[lease][es.Name] = struct{}{}
		v.sliceLease[es.Name] = lease
	}
	return keys
}

// deleteSlice forgets a slice; it returns the keys affected.
func (v *view) deleteSlice(name string) []string {
	old, ok := v.slices[name]
	if !ok {
		return nil
	}
	delete(v.slices, name)
	keys := make([]string, 0, len(old))
	for _, c := range old {
		if m := v.byKey[c.key]; m != nil {
			delete(m, name)
			if len(m) == 0 {
				delete(v.byKey, c.key)
			}
		}
		keys = append(keys, c.key)
	}
	if lease, ok := v.sliceLease[name]; ok {
		delete(v.sliceLease, name)
		if m := v.leaseSlices[lease]; m != nil {
			delete(m, name)
			if len(m) == 0 {
				delete(v.leaseSlices, lease)
			}
		}
	}
	return keys
}

// leaseKeys returns the keys of the slices tied to a Lease.
func (v *view) leaseKeys(name string) []string {
	var keys []string
	for s := range v.leaseSlices[name] {
		for _, c := range v.slices[s] {
			keys = append(keys, c.key)
		}
	}
	return keys
}

// setLease records a Lease seen in a watch event (fresh is false) or read
// by a get (fresh is true); it returns the keys affected.
func (v *view) setLease(l *coordinationv1.Lease, fresh bool) []string {
	r := leaseRecOf(l)
	old := v.leases[l.Name]
	expired := time.Now().After(v.deadline(r))
	switch {
	case fresh:
		r.dead = expired
	case old != nil && old.uid == r.uid:
		r.dead = old.dead && expired
	}
	v.leases[l.Name] = r
	if old != nil && old.dead == r.dead && old.uid == r.uid {
		return nil
	}
	return v.leaseKeys(l.Name)
}

func (v *view) deleteLease(name string) []string {
	if _, ok := v.leases[name]; !ok {
		return nil
	}
	delete(v.leases, name)
	return v.leaseKeys(name)
}

// due returns the live Leases, with slices, whose deadline has passed, and
// the earliest deadline of the others.
func (v *view) due(now time.Time) (names []string, next time.Time) {
	for name := range v.leaseSlices {
		r := v.leases[name]
		if r == nil || r.dead {
			continue
		}
		d := v.deadline(r)
		if !now.Before(d) {
			names = append(names, name)
		} else if next.IsZero() || d.Before(next) {
			next = d
		}
	}
	return names, next
}

// recompute re-evaluates keys and returns what changed in the delivered
// instances.
func (v *view) recompute(keys []string) (ups []driver.Instance, dels []string) {
	if len(keys) == 0 {
		return nil, nil
	}
	for _, k := range keys {
		if v.hasReady(k) {
			v.ready[k] = struct{}{}
		} else {
			delete(v.ready, k)
		}
	}
	if fb := len(v.ready) == 0; fb != v.fallback {
		// Whether serving, terminating endpoints count changed: every key.
		v.fallback = fb
		keys = keys[:0:0]
		for k := range v.byKey {
			keys = append(keys, k)
		}
		for k := range v.out {
			if _, ok := v.byKey[k]; !ok {
				keys = append(keys, k)
			}
		}
	}
	done := make(map[string]bool, len(keys))
	for _, k := range keys {
		if done[k] {
			continue
		}
		done[k] = true
		best := v.best(k)
		old, had := v.out[k]
		switch {
		case best == nil && had:
			delete(v.out, k)
			dels = append(dels, k)
		case best != nil && (!had || !sameInstance(old, best.inst)):
			v.out[k] = best.inst
			in := best.inst
			in.Metadata = maps.Clone(in.Metadata)
			ups = append(ups, in)
		}
	}
	return ups, dels
}

func (v *view) hasReady(k string) bool {
	for _, c := range v.byKey[k] {
		if c.ready && v.visible(c) {
			return true
		}
	}
	return false
}

func (v *view) best(k string) *cand {
	var best *cand
	for _, c := range v.byKey[k] {
		if c.ready && v.visible(c) && c.better(best) {
			best = c
		}
	}
	if best == nil && v.fallback {
		for _, c := range v.byKey[k] {
			if c.fallback && v.visible(c) && c.better(best) {
				best = c
			}
		}
	}
	return best
}

func sameInstance(a, b driver.Instance) bool {
	return a.Service == b.Service && a.ID == b.ID && a.Addr == b.Addr && maps.Equal(a.Metadata, b.Metadata)
}

// candidates returns the instances a slice offers for a target. Slices
// written by this package that cannot be read are skipped with a log line.
func (b *backend) candidates(t target, es *discoveryv1.EndpointSlice) []*cand {
	ours := es.Labels[LabelManagedBy] == ManagedBy
	var (
		lease, id, regService string
		leaseUID              types.UID
		md                    map[string]string
	)
	if ours {
		lease = es.Labels[LabelLease]
		id, regService = es.Annotations[AnnotationID], es.Annotations[AnnotationService]
		if lease == "" || id == "" || regService == "" {
			b.log.Warn("k8s: skipping endpointslice managed by rollcall.dev without lease, ID or service", "slice", es.Name)
			return nil
		}
		if raw := es.Annotations[AnnotationMetadata]; raw != "" {
			if err := json.Unmarshal([]byte(raw), &md); err != nil {
				b.log.Warn("k8s: skipping endpointslice with undecodable metadata", "slice", es.Name, "err", err)
				return nil
			}
		}
		for _, o := range es.OwnerReferences {
			if o.Kind == "Lease" && o.Name == lease {
				leaseUID = o.UID
			}
		}
	}
	ports := es.Ports
	if len(ports) == 0 && t.portNum != 0 {
		ports = []discoveryv1.EndpointPort{{}} // no ports defined: take the selector's
	}
	var out []*cand
	for _, p := range ports {
		if p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP {
			continue
		}
		var portName string
		if p.Name != nil {
			portName = *p.Name
		}
		var num int32
		switch {
		case t.portName != "":
			if portName != t.portName || p.Port == nil {
				continue
			}
			num = *p.Port
		case t.portNum != 0:
			if p.Port != nil && *p.Port != t.portNum {
				continue
			}
			num = t.portNum
		default:
			if p.Port == nil {
				continue
			}
			num = *p.Port
		}
		for i := range es.Endpoints {
			ep := &es.Endpoints[i]
			if len(ep.Addresses) == 0 {
				continue
			}
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			serving := ready
			if ep.Conditions.Serving != nil {
				serving = *ep.Conditions.Serving
			}
			terminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
			fallback := !ready && serving && terminating
			if !ready && !fallback {
				continue
			}
			addr := net.JoinHostPort(ep.Addresses[0], strconv.Itoa(int(num)))
			c := &cand{ready: ready, fallback: fallback, lease: lease, leaseUID: leaseUID,
				created: es.CreationTimestamp.Time, slice: es.Name}
			if ours {
				iid := id
				if regService != t.name {
					// Seen through another name than it was registered
					// with (all ports, or another port selector).
					iid = id + ":" + strconv.Itoa(int(num))
				}
				c.key = iid
				c.inst = driver.Instance{Service: t.name, ID: iid, Addr: addr, Metadata: maps.Clone(md)}
			} else {
				c.key = nativeID(ep.Addresses[0], num)
				c.inst = driver.Instance{Service: t.name, ID: c.key, Addr: addr, Metadata: nativeMeta(ep, portName, fallback)}
			}
			out = append(out, c)
		}
	}
	return out
}

// nativeID is the ID of an endpoint of a slice not written by this
// package: its address, "10.1.2.3:8080"; for IPv6, which an ID cannot hold
// in brackets, the canonical address without them, "fd00::3:8080" (the
// last field is the port).
func nativeID(host string, port int32) string {
	p := strconv.Itoa(int(port))
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.Is6() || ip.Is4In6() {
		return net.JoinHostPort(host, p)
	}
	s := ip.WithZone("").String()
	if strings.HasPrefix(s, ":") {
		s = "0" + s // "::a" is "0::a": an ID cannot start with ':'
	}
	return s + ":" + p
}

// nativeMeta is the metadata of an instance read from a slice not written
// by this package.
func nativeMeta(ep *discoveryv1.Endpoint, portName string, terminating bool) map[string]string {
	md := map[string]string{}
	set := func(k string, v *string) {
		if v != nil && *v != "" {
			md[k] = *v
		}
	}
	if ep.Zone != nil && len(validation.IsValidLabelValue(*ep.Zone)) == 0 {
		set(registry.MetaZone, ep.Zone)
	}
	set(MetaNode, ep.NodeName)
	set(MetaHostname, ep.Hostname)
	if ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
		set(MetaPod, &ep.TargetRef.Name)
	}
	set(MetaPortName, &portName)
	if ep.Hints != nil {
		var zones, nodes []string
		for _, z := range ep.Hints.ForZones {
			zones = append(zones, z.Name)
		}
		for _, n := range ep.Hints.ForNodes {
			nodes = append(nodes, n.Name)
		}
		if len(zones) > 0 {
			md[MetaHintZones] = strings.Join(zones, ",")
		}
		if len(nodes) > 0 {
			md[MetaHintNodes] = strings.Join(nodes, ",")
		}
	}
	if terminating {
		md[MetaTerminating] = "true"
	}
	if len(md) == 0 {
		return nil
	}
	return md
}
