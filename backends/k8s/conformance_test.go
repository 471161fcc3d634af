package k8s

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// harness runs every subtest in a namespace of its own on one API server
// shared by the whole suite (starting one takes seconds). Fault controls act
// on that server; Close undoes a fault a failed subtest left behind.
type harness struct {
	t   *testing.T
	env *kubeEnv
	ns  string

	mu      sync.Mutex
	paused  bool
	stopped bool
}

// restrictedUser has a valid token and no RBAC rule at all.
const restrictedUser = "restricted"

var (
	_ conformance.NamespaceMaker  = (*harness)(nil)
	_ conformance.RestrictedMaker = (*harness)(nil)
)

func TestConformance(t *testing.T) {
	env := startKube(t, restrictedUser)
	conformance.RunConformanceTests(t, func(ctx context.Context, t *testing.T) (conformance.Harness, error) {
		return &harness{t: t, env: env, ns: env.namespace(t)}, nil
	})
}

func (h *harness) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	r, err := NewForConfig(h.env.config(testserver.KubeAdmin), &Options{Namespace: h.ns, TTL: ttl, Logger: testLogger()})
	if err != nil {
		return nil, err
	}
	h.t.Cleanup(func() { _ = r.Close() })
	return r, nil
}

// MakeRegistryIn makes a registry in a Kubernetes namespace of its own for
// this subtest: the harness's namespace name, "-", namespace (created on
// first use), so that the suite's names stay apart from other subtests'.
func (h *harness) MakeRegistryIn(ctx context.Context, ttl time.Duration, namespace string) (registry.Registry, error) {
	ns := h.ns + "-" + namespace
	_, err := h.env.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	r, err := NewForConfig(h.env.config(testserver.KubeAdmin), &Options{Namespace: ns, TTL: ttl, Logger: testLogger()})
	if err != nil {
		return nil, err
	}
	h.t.Cleanup(func() { _ = r.Close() })
	return r, nil
}

// MakeRestrictedRegistry makes a registry whose user the API server
// authenticates but that no RBAC rule allows anything.
func (h *harness) MakeRestrictedRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	r, err := NewForConfig(h.env.config(restrictedUser), &Options{Namespace: h.ns, TTL: ttl, Logger: testLogger()})
	if err != nil {
		return nil, err
	}
	h.t.Cleanup(func() { _ = r.Close() })
	return r, nil
}

// Crash stops the registry's goroutines first, so that nothing is renewed
// or deleted; Close then only releases what is left.
func (h *harness) Crash(r registry.Registry) error {
	r.(*kubeRegistry).b.crash()
	_ = r.Close() // reports that the crashed client could not deregister
	return nil
}

func (h *harness) URLs() (string, []string) {
	kc := url.QueryEscape(h.env.srv.WriteKubeconfig(testserver.KubeAdmin, h.ns))
	return "k8s://" + h.ns + "?kubeconfig=" + kc + "&ttl=2s", []string{
		"k8s://" + h.ns + "?kubeconfig=" + kc + "&ttl=banana",
		"k8s://" + h.ns + "?kubeconfig=" + kc + "&ttl=-1s",
		"k8s://" + h.ns + "?kubeconfig=" + kc + "&unknown=1",
		"k8s://" + h.ns + "?kubeconfig=" + kc + "&context=no-such-context",
		"k8s://" + h.ns + "?kubeconfig=/nonexistent/kubeconfig",
		"k8s://" + h.ns + "/svc:80?kubeconfig=" + kc,
		"k8s://" + h.ns + ":6443?kubeconfig=" + kc,
		"k8s://Not_A_Namespace?kubeconfig=" + kc,
		"k8s://admin:s3cret@" + h.ns + "?kubeconfig=" + kc,
		"k8s://" + h.ns + "?kubeconfig=" + kc + "&token=hunter2",
		"k8s:opaque",
		"k8s://%zz",
	}
}

func (h *harness) PauseServer(context.Context) error {
	h.env.srv.Pause()
	h.mu.Lock()
	h.paused = true
	h.mu.Unlock()
	return nil
}

func (h *harness) ResumeServer(context.Context) error {
	h.env.srv.Resume()
	h.mu.Lock()
	h.paused = false
	h.mu.Unlock()
	return nil
}

func (h *harness) StopServer(context.Context) error {
	h.env.srv.Stop()
	h.mu.Lock()
	h.stopped = true
	h.mu.Unlock()
	return nil
}

// StartServer starts the API server again. With wipe, etcd is restarted
// empty first; the harness then creates its namespace again, as a cluster's
// GitOps would restore it: the Leases and EndpointSlices are not restored.
func (h *harness) StartServer(ctx context.Context, wipe bool) error {
	h.env.srv.Restart(wipe)
	h.mu.Lock()
	h.stopped = false
	h.mu.Unlock()
	if wipe {
		h.env.createNamespace(h.t, h.ns)
	}
	return nil
}

// RevokeLeases deletes every Lease of a registrar in the namespace.
func (h *harness) RevokeLeases(ctx context.Context) error {
	api := h.env.admin.CoordinationV1().Leases(h.ns)
	list, err := api.List(ctx, metav1.ListOptions{LabelSelector: leaseSelector})
	if err != nil {
		return err
	}
	for _, l := range list.Items {
		if err := api.Delete(ctx, l.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return nil
}

// DeleteInstance deletes the EndpointSlice of one registered instance.
func (h *harness) DeleteInstance(ctx context.Context, service, id string) error {
	api := h.env.admin.DiscoveryV1().EndpointSlices(h.ns)
	t, err := parseTarget(service)
	if err != nil {
		return err
	}
	list, err := api.List(ctx, metav1.ListOptions{LabelSelector: t.selector() + "," + LabelManagedBy + "=" + ManagedBy})
	if err != nil {
		return err
	}
	n := 0
	for _, es := range list.Items {
		if es.Annotations[AnnotationService] == service && es.Annotations[AnnotationID] == id {
			if err := api.Delete(ctx, es.Name, metav1.DeleteOptions{}); err != nil {
				return err
			}
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("no endpointslice for %s/%s", service, id)
	}
	return nil
}

// WriteGarbage writes, under a live Lease, slices managed by rollcall.dev
// that are not valid instances, and a plain slice with a port Kubernetes
// accepts but that is no valid address.
func (h *harness) WriteGarbage(ctx context.Context, service string) error {
	_, err := h.env.admin.CoordinationV1().Leases(h.ns).Create(ctx, lease("garbage-lease", time.Now(), 3600), metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	api := h.env.admin.DiscoveryV1().EndpointSlices(h.ns)
	tcp := corev1.ProtocolTCP
	mk := func(name string, ann map[string]string, managed bool, port int32) *discoveryv1.EndpointSlice {
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: map[string]string{LabelServiceName: service}, Annotations: ann},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.9.9.9"}}},
			Ports:       []discoveryv1.EndpointPort{{Port: &port, Protocol: &tcp}},
		}
		if managed {
			es.Labels[LabelManagedBy] = ManagedBy
			es.Labels[LabelLease] = "garbage-lease"
		}
		return es
	}
	for _, es := range []*discoveryv1.EndpointSlice{
		mk("garbage-metadata", map[string]string{AnnotationService: service, AnnotationID: "md", AnnotationMetadata: "{{{"}, true, 9100),
		mk("garbage-bad-id", map[string]string{AnnotationService: service, AnnotationID: "bad/id"}, true, 9101),
		mk("garbage-no-id", map[string]string{AnnotationService: service}, true, 9102),
		mk("garbage-weight", map[string]string{AnnotationService: service, AnnotationID: "w", AnnotationMetadata: `{"weight":"lots"}`}, true, 9103),
		mk("garbage-port-zero", nil, false, 0),
	} {
		if _, err := api.Create(ctx, es, metav1.CreateOptions{}); err != nil {
			if apierrors.IsInvalid(err) && es.Name == "garbage-port-zero" {
				h.t.Logf("the API server refuses port 0: %v", err)
				continue
			}
			return err
		}
	}
	return nil
}

func (h *harness) Close() {
	h.mu.Lock()
	paused, stopped := h.paused, h.stopped
	h.mu.Unlock()
	if paused {
		h.env.srv.Resume()
	}
	if stopped || !h.env.srv.Running() {
		h.env.srv.Start()
	}
}
