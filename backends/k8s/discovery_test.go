package k8s

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// endpoint is a test endpoint as the EndpointSlice controller writes it for
// a pod.
type endpoint struct {
	pod, ip, zone, node  string
	ready, serving, term *bool
	hintZones, hintNodes []string
}

var (
	yes = ptr(true)
	no  = ptr(false)
)

func ptr[T any](v T) *T { return &v }

// controllerSlice is an EndpointSlice as the EndpointSlice controller
// writes it for a Service with ports http (8080) and grpc (9090).
func controllerSlice(name, service string, family discoveryv1.AddressType, eps ...endpoint) *discoveryv1.EndpointSlice {
	tcp := corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				LabelServiceName: service,
				LabelManagedBy:   "endpointslice-controller.k8s.io",
			},
		},
		AddressType: family,
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: &tcp},
			{Name: ptr("grpc"), Port: ptr(int32(9090)), Protocol: &tcp},
		},
	}
	for _, e := range eps {
		ep := discoveryv1.Endpoint{
			Addresses:  []string{e.ip},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.term},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: e.pod},
		}
		if e.zone != "" {
			ep.Zone = ptr(e.zone)
		}
		if e.node != "" {
			ep.NodeName = ptr(e.node)
		}
		if len(e.hintZones)+len(e.hintNodes) > 0 {
			ep.Hints = &discoveryv1.EndpointHints{}
			for _, z := range e.hintZones {
				ep.Hints.ForZones = append(ep.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
			for _, n := range e.hintNodes {
				ep.Hints.ForNodes = append(ep.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		}
		es.Endpoints = append(es.Endpoints, ep)
	}
	return es
}

func createService(t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	_, err := cs.CoreV1().Services(ns).Create(ctxFor(t, 30*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)},
				{Name: "grpc", Port: 81, TargetPort: intstr.FromInt32(9090)},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func putSlice(t *testing.T, cs kubernetes.Interface, ns string, es *discoveryv1.EndpointSlice) {
	t.Helper()
	api := cs.DiscoveryV1().EndpointSlices(ns)
	ctx := ctxFor(t, 30*time.Second)
	cur, err := api.Get(ctx, es.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(ctx, es, metav1.CreateOptions{})
	case err == nil:
		es = es.DeepCopy()
		es.ResourceVersion = cur.ResourceVersion
		_, err = api.Update(ctx, es, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatalf("writing endpointslice %s: %v", es.Name, err)
	}
}

func deleteSlice(t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	if err := cs.DiscoveryV1().EndpointSlices(ns).Delete(ctxFor(t, 30*time.Second), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// follower keeps the latest snapshot of a Watcher.
type follower struct {
	w    *registry.Watcher
	done chan struct{}
	snap chan []registry.Instance // latest synced snapshot, capacity 1
	log  chan registry.Update     // every update, for order checks
}

func follow(t *testing.T, r registry.Registry, service string) *follower {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	f := &follower{w: w, done: make(chan struct{}), snap: make(chan []registry.Instance, 1), log: make(chan registry.Update, 1000)}
	go func() {
		defer close(f.done)
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			select {
			case f.log <- u:
			default:
			}
			if !u.Synced {
				continue
			}
			select {
			case <-f.snap:
			default:
			}
			f.snap <- u.Instances()
		}
	}()
	t.Cleanup(func() { cancel(); w.Close(); <-f.done })
	return f
}

// wait waits until the snapshot's instances satisfy ok, and returns them.
func (f *follower) wait(t *testing.T, what string, ok func([]registry.Instance) bool) []registry.Instance {
	t.Helper()
	var last []registry.Instance
	deadline := time.After(20 * time.Second)
	for {
		select {
		case s := <-f.snap:
			last = s
			if ok(s) {
				f.snap <- s // keep it for the next wait
				return s
			}
		case <-deadline:
			t.Fatalf("watcher of %s: timed out waiting for %s; last snapshot %v", f.w.Service(), what, last)
		}
	}
}

func (f *follower) waitIDs(t *testing.T, want ...string) []registry.Instance {
	t.Helper()
	slices.Sort(want)
	return f.wait(t, "IDs "+join(want), func(s []registry.Instance) bool { return slices.Equal(ids(s), want) })
}

func join(s []string) string {
	out := "["
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out + "]"
}

func lookupIDs(t *testing.T, r registry.Registry, service string) []string {
	t.Helper()
	list, err := r.Lookup(ctxFor(t, 30*time.Second), service)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", service, err)
	}
	return ids(list)
}

func TestDiscovery(t *testing.T) {
	env := startKube(t, "alice", "bob", "carol", "dave", "frank", "kai")
	t.Run("PlainServicePortsByNameNumberOrAll", func(t *testing.T) { testPlainService(t, env) })
	t.Run("SlicesOfAServiceAreMerged", func(t *testing.T) { testMultiSlice(t, env) })
	t.Run("ConditionsReadyServingTerminating", func(t *testing.T) { testConditions(t, env) })
	t.Run("DualStackSlices", func(t *testing.T) { testDualStack(t, env) })
	t.Run("ServicesListsThoseWithEndpoints", func(t *testing.T) { testServices(t, env) })
	t.Run("RegistrationIsALeasedEndpointSlice", func(t *testing.T) { testRegistrationShape(t, env) })
	t.Run("ExpiredLeaseHidesSlicesAndIsCollected", func(t *testing.T) { testExpiredLease(t, env) })
	t.Run("OneLeasePerRegistryDeletedWithTheLastRegistration", func(t *testing.T) { testOneLease(t, env) })
	t.Run("RBACRefusalNamesVerbAndResource", func(t *testing.T) { testRBAC(t, env) })
	t.Run("ServicesNeedOnlyEndpointSliceRights", func(t *testing.T) { testServiceDiscoveryRBAC(t, env) })
	t.Run("KlogIsRoutedOnlyWhenAsked", func(t *testing.T) { testKlogIsRoutedOnlyWhenAsked(t, env) })
	t.Run("WatchOutlivesOpeningCtx", func(t *testing.T) { testWatchOutlivesOpeningCtx(t, env) })
	t.Run("DuplicateIDIsAConflict", func(t *testing.T) { testDuplicateIDIsAConflict(t, env) })
	t.Run("RacingDuplicatesLeaveOne", func(t *testing.T) { testRacingDuplicatesLeaveOne(t, env) })
	t.Run("WithdrawDeletesTheLeaseOrFails", func(t *testing.T) { testWithdrawDeletesTheLeaseOrFails(t, env) })
}

func testPlainService(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	createService(t, env.admin, ns, "web")
	putSlice(t, env.admin, ns, controllerSlice("web-abc12", "web", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "web-1", ip: "10.1.0.1", zone: "z1", node: "n1", hintZones: []string{"z1"}, hintNodes: []string{"n1"}}))
	r := env.open(t, testserver.KubeAdmin, ns, 0)

	list, err := r.Lookup(ctxFor(t, 30*time.Second), "web:http")
	if err != nil {
		t.Fatal(err)
	}
	want := registry.Instance{Service: "web:http", ID: "10.1.0.1:8080", Addr: "10.1.0.1:8080", Metadata: map[string]string{
		registry.MetaZone: "z1", MetaNode: "n1", MetaPod: "web-1", MetaPortName: "http", MetaHintZones: "z1", MetaHintNodes: "n1"}}
	if len(list) != 1 || !list[0].Equal(want) {
		t.Fatalf("Lookup(web:http) = %v, want [%v]", list, want)
	}
	for svc, wantIDs := range map[string][]string{
		"web:9090": {"10.1.0.1:9090"},
		"web:grpc": {"10.1.0.1:9090"},
		"web":      {"10.1.0.1:8080", "10.1.0.1:9090"},
		"web:80":   {}, // the Service's port, not the pods': no endpoint listens there
		"web:nope": {},
		"webx":     {},
	} {
		if got := lookupIDs(t, r, svc); !slices.Equal(got, wantIDs) {
			t.Errorf("Lookup(%q) = %v, want %v", svc, got, wantIDs)
		}
	}

	// The controller scales up, then pod web-1 stops being ready.
	f := follow(t, r, "web:grpc")
	f.waitIDs(t, "10.1.0.1:9090")
	putSlice(t, env.admin, ns, controllerSlice("web-abc12", "web", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "web-1", ip: "10.1.0.1", zone: "z1"}, endpoint{pod: "web-2", ip: "10.1.0.2", zone: "z2"}))
	got := f.waitIDs(t, "10.1.0.1:9090", "10.1.0.2:9090")
	if got[1].Zone() != "z2" || got[1].Metadata[MetaPod] != "web-2" {
		t.Errorf("new endpoint = %v", got[1])
	}
	putSlice(t, env.admin, ns, controllerSlice("web-abc12", "web", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "web-1", ip: "10.1.0.1", ready: no, serving: no}, endpoint{pod: "web-2", ip: "10.1.0.2", zone: "z2"}))
	f.waitIDs(t, "10.1.0.2:9090")
	deleteSlice(t, env.admin, ns, "web-abc12")
	f.waitIDs(t)
}

func testMultiSlice(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 0)
	putSlice(t, env.admin, ns, controllerSlice("multi-a", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p1", ip: "10.2.0.1"}, endpoint{pod: "p2", ip: "10.2.0.2"}))
	putSlice(t, env.admin, ns, controllerSlice("multi-b", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p3", ip: "10.2.0.3"}))
	f := follow(t, r, "multi:http")
	f.waitIDs(t, "10.2.0.1:8080", "10.2.0.2:8080", "10.2.0.3:8080")
	mark := len(f.log)

	// An update of one slice does not replace the others.
	putSlice(t, env.admin, ns, controllerSlice("multi-b", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p3", ip: "10.2.0.3"}, endpoint{pod: "p4", ip: "10.2.0.4"}))
	f.waitIDs(t, "10.2.0.1:8080", "10.2.0.2:8080", "10.2.0.3:8080", "10.2.0.4:8080")

	// The controller moves p3 from multi-b to multi-a: for a moment it is
	// in both; taking it out of multi-b must not remove it.
	putSlice(t, env.admin, ns, controllerSlice("multi-a", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p1", ip: "10.2.0.1"}, endpoint{pod: "p2", ip: "10.2.0.2"}, endpoint{pod: "p3", ip: "10.2.0.3"}))
	putSlice(t, env.admin, ns, controllerSlice("multi-b", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p4", ip: "10.2.0.4"}))
	// A marker change, so that everything before it has been delivered.
	putSlice(t, env.admin, ns, controllerSlice("multi-c", "multi", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "p5", ip: "10.2.0.5"}))
	f.waitIDs(t, "10.2.0.1:8080", "10.2.0.2:8080", "10.2.0.3:8080", "10.2.0.4:8080", "10.2.0.5:8080")
	for len(f.log) > 0 && mark > 0 {
		<-f.log
		mark--
	}
	for len(f.log) > 0 {
		u := <-f.log
		if len(u.Removed) > 0 {
			t.Fatalf("an endpoint moving between slices was removed: %v", u.Removed)
		}
	}
	// Deleting a slice removes only what it alone held.
	deleteSlice(t, env.admin, ns, "multi-a")
	f.waitIDs(t, "10.2.0.4:8080", "10.2.0.5:8080")
	if got := lookupIDs(t, r, "multi:http"); !slices.Equal(got, []string{"10.2.0.4:8080", "10.2.0.5:8080"}) {
		t.Fatalf("Lookup = %v", got)
	}
}

func testConditions(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 0)
	put := func(eps ...endpoint) {
		putSlice(t, env.admin, ns, controllerSlice("cond-a", "cond", discoveryv1.AddressTypeIPv4, eps...))
	}
	readyNil := endpoint{pod: "ready-nil", ip: "10.3.0.1"}
	readyTrue := endpoint{pod: "ready-true", ip: "10.3.0.2", ready: yes, serving: yes, term: no}
	notReady := endpoint{pod: "not-ready", ip: "10.3.0.3", ready: no, serving: no, term: no}
	draining := endpoint{pod: "draining", ip: "10.3.0.4", ready: no, serving: yes, term: yes}
	dead := endpoint{pod: "dead", ip: "10.3.0.5", ready: no, serving: no, term: yes}
	put(readyNil, readyTrue, notReady, draining, dead)
	f := follow(t, r, "cond:http")
	f.waitIDs(t, "10.3.0.1:8080", "10.3.0.2:8080")

	// No ready endpoint left: the serving, terminating one is used, marked.
	put(notReady, draining, dead)
	got := f.waitIDs(t, "10.3.0.4:8080")
	if got[0].Metadata[MetaTerminating] != "true" {
		t.Fatalf("draining endpoint without %s: %v", MetaTerminating, got[0])
	}
	if got := lookupIDs(t, r, "cond:http"); !slices.Equal(got, []string{"10.3.0.4:8080"}) {
		t.Fatalf("Lookup = %v", got)
	}
	// A ready endpoint is back: the draining one is dropped.
	put(notReady, draining, dead, readyTrue)
	f.waitIDs(t, "10.3.0.2:8080")
	put(notReady, dead)
	f.waitIDs(t)
}

func testDualStack(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 0)
	putSlice(t, env.admin, ns, controllerSlice("ds-v4", "ds", discoveryv1.AddressTypeIPv4, endpoint{pod: "p1", ip: "10.4.0.1"}))
	putSlice(t, env.admin, ns, controllerSlice("ds-v6", "ds", discoveryv1.AddressTypeIPv6, endpoint{pod: "p1", ip: "fd00::4:1"}))
	f := follow(t, r, "ds:http")
	got := f.waitIDs(t, "10.4.0.1:8080", "fd00::4:1:8080")
	for _, in := range got {
		if in.Metadata[MetaPod] != "p1" {
			t.Errorf("instance %v: pod %q", in, in.Metadata[MetaPod])
		}
	}
	deleteSlice(t, env.admin, ns, "ds-v4")
	f.waitIDs(t, "fd00::4:1:8080")
	if got[1].Addr != "[fd00::4:1]:8080" {
		t.Errorf("IPv6 instance address %q", got[1].Addr)
	}
}

func testRegistrationShape(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	in := registry.Instance{Service: "reg:grpc", ID: "a", Addr: "10.5.0.1:9000", Metadata: map[string]string{registry.MetaZone: "z2", "team": "core"}}
	reg, err := r.Register(ctxFor(t, 30*time.Second), in)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t, 30*time.Second)
	list, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: LabelServiceName + "=reg"})
	if err != nil || len(list.Items) != 1 {
		t.Fatalf("slices of reg: %v, %v", list, err)
	}
	es := list.Items[0]
	if es.Labels[LabelManagedBy] != ManagedBy || es.AddressType != discoveryv1.AddressTypeIPv4 ||
		es.Annotations[AnnotationID] != "a" || es.Annotations[AnnotationService] != "reg:grpc" ||
		len(es.Ports) != 1 || *es.Ports[0].Name != "grpc" || *es.Ports[0].Port != 9000 ||
		len(es.Endpoints) != 1 || es.Endpoints[0].Addresses[0] != "10.5.0.1" || *es.Endpoints[0].Zone != "z2" {
		t.Fatalf("registered slice: %+v", es)
	}
	if len(es.OwnerReferences) != 1 || es.OwnerReferences[0].Kind != "Lease" || es.OwnerReferences[0].Name != es.Labels[LabelLease] {
		t.Fatalf("slice owner: %+v", es.OwnerReferences)
	}
	l, err := env.admin.CoordinationV1().Leases(ns).Get(ctx, es.Labels[LabelLease], metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.UID != es.OwnerReferences[0].UID || *l.Spec.LeaseDurationSeconds != 3 || l.Labels[LabelAppManagedBy] != ManagedBy {
		t.Fatalf("lease: %+v", l)
	}
	// One Lease for many registrations.
	if _, err := r.Register(ctx, registry.Instance{Service: "reg", ID: "b", Addr: "10.5.0.2:9001"}); err != nil {
		t.Fatal(err)
	}
	leases, err := env.admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{LabelSelector: leaseSelector})
	if err != nil || len(leases.Items) != 1 {
		t.Fatalf("leases: %d, %v", len(leases.Items), err)
	}

	// The ID rule: the registered ID under the registered name, ID:port
	// under any other name.
	for svc, want := range map[string][]string{
		"reg:grpc": {"a"},
		"reg":      {"a:9000", "b"},
		"reg:9000": {"a:9000"},
		"reg:9001": {"b:9001"},
	} {
		if got := lookupIDs(t, r, svc); !slices.Equal(got, want) {
			t.Errorf("Lookup(%q) = %v, want %v", svc, got, want)
		}
	}
	got, err := r.Lookup(ctx, "reg:grpc")
	if err != nil || len(got) != 1 || !maps.Equal(got[0].Metadata, in.Metadata) {
		t.Fatalf("Lookup(reg:grpc) = %v, %v", got, err)
	}

	// A port number in the service name must be the address's.
	if _, err := r.Register(ctx, registry.Instance{Service: "reg:9000", ID: "c", Addr: "10.5.0.3:9999"}); !errors.Is(err, registry.ErrInvalidInstance) {
		t.Errorf("Register with a mismatched port: %v, want ErrInvalidInstance", err)
	}
	for _, name := range []string{"bad_", "a:b:c", "x:", "x:0", "x:70000", "x:Bad_Name", "-x"} {
		if _, err := r.Lookup(ctx, name); !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("Lookup(%q): %v, want ErrInvalidInstance", name, err)
		}
	}
	if _, err := r.Register(ctx, registry.Instance{Service: "reg", ID: "v6", Addr: "[::1]:80"}); !errors.Is(err, registry.ErrInvalidInstance) {
		t.Errorf("Register of ::1: %v, want ErrInvalidInstance", err)
	}
	// IPv6 and DNS names are registered in slices of their type.
	for _, in := range []registry.Instance{
		{Service: "reg6", ID: "six", Addr: "[fd00::5:1]:80"},
		{Service: "regdns", ID: "dns", Addr: "db.example.com:5432"},
	} {
		if _, err := r.Register(ctx, in); err != nil {
			t.Fatalf("Register(%v): %v", in, err)
		}
		got, err := r.Lookup(ctx, in.Service)
		if err != nil || len(got) != 1 || got[0].Addr != in.Addr {
			t.Fatalf("Lookup(%s) = %v, %v", in.Service, got, err)
		}
	}

	// Close deletes the Lease and every slice.
	if err := reg.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	leases, err = env.admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
	if err != nil || len(leases.Items) != 0 {
		t.Fatalf("leases after Close: %v, %v", leases.Items, err)
	}
	all, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{})
	if err != nil || len(all.Items) != 0 {
		t.Fatalf("slices after Close: %d, %v", len(all.Items), err)
	}
}

func testExpiredLease(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	ctx := ctxFor(t, time.Minute)
	leases := env.admin.CoordinationV1().Leases(ns)
	// A registrar that died a minute ago, and one whose Lease was deleted
	// (no garbage collector runs here to delete its slice).
	old, err := leases.Create(ctx, lease("dead-registrar", time.Now().Add(-time.Minute), 2), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	live := env.open(t, testserver.KubeAdmin, ns, 2*time.Second)
	if _, err := live.Register(ctx, registry.Instance{Service: "exp", ID: "live", Addr: "10.6.0.9:80"}); err != nil {
		t.Fatal(err)
	}
	mk := func(name, leaseName string, owner *coordinationv1.Lease, id, ip string) {
		tcp := corev1.ProtocolTCP
		es := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name,
				Labels:      map[string]string{LabelServiceName: "exp", LabelManagedBy: ManagedBy, LabelLease: leaseName},
				Annotations: map[string]string{AnnotationService: "exp", AnnotationID: id}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ip}}},
			Ports:       []discoveryv1.EndpointPort{{Name: ptr(""), Port: ptr(int32(80)), Protocol: &tcp}},
		}
		if owner != nil {
			es.OwnerReferences = []metav1.OwnerReference{{APIVersion: "coordination.k8s.io/v1", Kind: "Lease", Name: owner.Name, UID: owner.UID}}
		}
		putSlice(t, env.admin, ns, es)
	}
	mk("exp-dead", "dead-registrar", old, "dead", "10.6.0.1")
	mk("exp-orphan", "deleted-registrar", nil, "orphan", "10.6.0.2")

	// A process that has just started has not seen the old Lease
	// unrenewed (it may have missed an outage that kept its registrar from
	// renewing): it lists its instance, and drops it once it has seen the
	// Lease unrenewed for its duration plus the clock-skew allowance.
	r := env.open(t, testserver.KubeAdmin, ns, 0)
	start := time.Now()
	if got := lookupIDs(t, r, "exp"); !slices.Equal(got, []string{"dead", "live"}) {
		t.Fatalf("first Lookup = %v, want [dead live]", got)
	}
	f := follow(t, r, "exp")
	f.waitIDs(t, "live")
	if d := time.Since(start); d < 3*time.Second {
		t.Errorf("an old lease expired %v after this client first reached the server, before its duration and allowance", d)
	}
	if got := lookupIDs(t, r, "exp"); !slices.Equal(got, []string{"live"}) {
		t.Fatalf("Lookup after expiry = %v, want [live]", got)
	}
	// The watcher collected the expired Lease and both stale slices.
	waitFor(t, 20*time.Second, "the expired lease and stale slices to be deleted", func() bool {
		_, err := leases.Get(ctx, "dead-registrar", metav1.GetOptions{})
		_, errA := env.admin.DiscoveryV1().EndpointSlices(ns).Get(ctx, "exp-dead", metav1.GetOptions{})
		_, errB := env.admin.DiscoveryV1().EndpointSlices(ns).Get(ctx, "exp-orphan", metav1.GetOptions{})
		return apierrors.IsNotFound(err) && apierrors.IsNotFound(errA) && apierrors.IsNotFound(errB)
	})

	// A Lease that stops being renewed expires for the watcher, which
	// drops its instance at once (well before any deletion).
	stopping, err := leases.Create(ctx, lease("stopping", time.Now(), 2), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mk("exp-stopping", "stopping", stopping, "stopping", "10.6.0.3")
	f.waitIDs(t, "live", "stopping")
	start = time.Now()
	f.waitIDs(t, "live")
	// Lease duration 2s + clock skew 1s after its renewTime, plus the
	// time to read it again; the instance was visible for part of that.
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("expired instance dropped after %v", d)
	}
}

func TestParseTarget(t *testing.T) {
	for name, want := range map[string]target{
		"web":       {name: "web", service: "web"},
		"web:http":  {name: "web:http", service: "web", portName: "http"},
		"web:8080":  {name: "web:8080", service: "web", portNum: 8080},
		"user.rpc":  {name: "user.rpc", service: "user.rpc"},
		"A_b.c-d:1": {name: "A_b.c-d:1", service: "A_b.c-d", portNum: 1},
	} {
		got, err := parseTarget(name)
		if err != nil || got != want {
			t.Errorf("parseTarget(%q) = %+v, %v; want %+v", name, got, err, want)
		}
	}
	for _, name := range []string{"", ":80", "web:", "web:0", "web:65536", "web:a:b", "web:Http", "web:-x", "_web", "web.",
		"a234567890123456789012345678901234567890123456789012345678901234"} {
		if _, err := parseTarget(name); !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("parseTarget(%q) error = %v, want ErrInvalidInstance", name, err)
		}
	}
	if n := sliceName("rollcall-h-0a1b2c3d4e", "User.RPC_x:grpc", "a"); len(n) > 63 || n != dnsLabelish(n, 63) {
		t.Errorf("sliceName = %q", n)
	}
}

// testOneLease: many registrations share one Lease, and Deregister of the
// last one deletes it, so an idle Registry renews nothing.
func testOneLease(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 5*time.Second)
	ctx := ctxFor(t, time.Minute)
	leases := func() int {
		list, err := env.admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return len(list.Items)
	}
	var regs []*registry.Registration
	for i := range 20 {
		reg, err := r.Register(ctx, registry.Instance{Service: fmt.Sprintf("svc-%d", i%3), ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 2000+i)})
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, reg)
	}
	if n := leases(); n != 1 {
		t.Fatalf("20 registrations hold %d Leases, want 1", n)
	}
	for _, reg := range regs {
		if err := reg.Deregister(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := leases(); n != 0 {
		t.Fatalf("after the last Deregister %d Leases remain, want 0", n)
	}
	// The Registry registers again with a new Lease.
	if _, err := r.Register(ctx, registry.Instance{Service: "svc-0", ID: "again", Addr: "127.0.0.1:3000"}); err != nil {
		t.Fatal(err)
	}
	if n := leases(); n != 1 {
		t.Fatalf("after registering again %d Leases, want 1", n)
	}
}
