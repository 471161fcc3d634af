package k8s

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/rollcall-go/rollcall/registry"
)

// applyManifest creates the Roles and RoleBindings of a file in deploy/rbac/
// in ns, binding them to user instead of the ServiceAccount they name.
func applyManifest(t *testing.T, env *kubeEnv, path, ns, user string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t, 30*time.Second)
	n := 0
	for _, doc := range strings.Split(string(data), "\n---") {
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		var head metav1.TypeMeta
		if err := json.Unmarshal(js, &head); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		switch head.Kind {
		case "Role":
			var r rbacv1.Role
			if err := json.Unmarshal(js, &r); err != nil {
				t.Fatal(err)
			}
			if _, err := env.admin.RbacV1().Roles(ns).Create(ctx, &r, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		case "RoleBinding":
			var rb rbacv1.RoleBinding
			if err := json.Unmarshal(js, &rb); err != nil {
				t.Fatal(err)
			}
			rb.Subjects = []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: user}}
			if _, err := env.admin.RbacV1().RoleBindings(ns).Create(ctx, &rb, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("%s: unexpected kind %q", path, head.Kind)
		}
		n++
	}
	if n != 2 {
		t.Fatalf("%s: %d objects, want a Role and a RoleBinding", path, n)
	}
}

func grant(t *testing.T, env *kubeEnv, ns, user string, rules ...rbacv1.PolicyRule) {
	t.Helper()
	ctx := ctxFor(t, 30*time.Second)
	if _, err := env.admin.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: user}, Rules: rules}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: user},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: user},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: user}},
	}
	if _, err := env.admin.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func wantForbidden(t *testing.T, what string, err error, verb, resource string) {
	t.Helper()
	var fe *ForbiddenError
	if !errors.As(err, &fe) || !errors.Is(err, ErrForbidden) {
		t.Fatalf("%s: %v, want a *ForbiddenError", what, err)
	}
	if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("%s: %v is not registry.ErrPermission (or is also ErrUnavailable)", what, err)
	}
	if fe.Verb != verb || fe.Resource != resource {
		t.Fatalf("%s: forbidden %q on %q, want %q on %q", what, fe.Verb, fe.Resource, verb, resource)
	}
	if msg := err.Error(); !strings.Contains(msg, `"`+verb+`"`) || !strings.Contains(msg, resource) {
		t.Fatalf("%s: message %q does not name the verb and the resource", what, msg)
	}
}

// testRBAC: the shipped Roles are enough for discovery (alice) and
// registration (bob); a missing verb is named in the error.
func testRBAC(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	applyManifest(t, env, "../../deploy/rbac/discovery.yaml", ns, "alice")
	applyManifest(t, env, "../../deploy/rbac/registration.yaml", ns, "bob")
	grant(t, env, ns, "carol",
		rbacv1.PolicyRule{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list"}},
		rbacv1.PolicyRule{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "watch"}})
	// RBAC rules take effect through the API server's informers: wait.
	bob := env.open(t, "bob", ns, 2*time.Second)
	var err error
	waitFor(t, 10*time.Second, "bob's Role to take effect", func() bool {
		_, err = bob.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "rbac", ID: "b", Addr: "10.7.0.1:80"})
		return err == nil
	})

	alice := env.open(t, "alice", ns, 2*time.Second)
	if got := lookupIDs(t, alice, "rbac"); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("alice Lookup = %v", got)
	}
	f := follow(t, alice, "rbac")
	f.waitIDs(t, "b")
	_, err = alice.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "rbac", ID: "a", Addr: "10.7.0.2:80"})
	wantForbidden(t, "alice Register", err, "create", "leases.coordination.k8s.io")

	// carol may list but not watch endpointslices: her watcher turns stale
	// with an error that says so.
	carol := env.open(t, "carol", ns, 2*time.Second)
	if got := lookupIDs(t, carol, "rbac"); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("carol Lookup = %v", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := carol.Watch(ctx, "rbac")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("carol's watcher never reported the refusal: %v", err)
		}
		if u.Stale {
			wantForbidden(t, "carol Watch", u.Err, "watch", "endpointslices.discovery.k8s.io")
			break
		}
	}

	// dave has no Role at all.
	dave := env.open(t, "dave", ns, 2*time.Second)
	_, err = dave.Lookup(ctxFor(t, 10*time.Second), "rbac")
	wantForbidden(t, "dave Lookup", err, "list", "endpointslices.discovery.k8s.io")
	err = dave.Ping(ctxFor(t, 10*time.Second))
	wantForbidden(t, "dave Ping", err, "list", "endpointslices.discovery.k8s.io")

	// A token the API server does not know: a permission error too (401),
	// not an outage.
	cfg := env.config("dave")
	cfg.BearerToken = "not-a-token"
	eve, err := NewForConfig(cfg, &Options{Namespace: ns, TTL: 2 * time.Second, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer eve.Close()
	for what, err := range map[string]error{
		"Ping":   eve.Ping(ctxFor(t, 10*time.Second)),
		"Lookup": func() error { _, err := eve.Lookup(ctxFor(t, 10*time.Second), "rbac"); return err }(),
	} {
		if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) || !strings.Contains(fmt.Sprint(err), "credentials") {
			t.Fatalf("%s with an unknown token: %v, want registry.ErrPermission naming the credentials", what, err)
		}
	}
}

// testServiceDiscoveryRBAC (issue 11 item 1): with get, list and watch on
// endpointslices only (deploy/rbac/service-discovery.yaml, what
// kube-proxy-style resolvers document), discovering a plain Service works:
// Lookup answers and a watcher is fresh, also once a rollcall registrar
// adds a registered slice to the same service (the Leases that gate it
// cannot be read: it is taken as it is, with one warning) and when it
// deregisters.
func testServiceDiscoveryRBAC(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	applyManifest(t, env, "../../deploy/rbac/service-discovery.yaml", ns, "kai")
	applyManifest(t, env, "../../deploy/rbac/registration.yaml", ns, "bob")
	createService(t, env.admin, ns, "plain")
	putSlice(t, env.admin, ns, controllerSlice("plain-abc12", "plain", discoveryv1.AddressTypeIPv4, endpoint{pod: "plain-1", ip: "10.8.0.1"}))
	kai := env.open(t, "kai", ns, 2*time.Second)
	var list []registry.Instance
	var err error
	// RBAC rules take effect through the API server's informers: wait.
	waitFor(t, 10*time.Second, "kai's Role to take effect", func() bool {
		list, err = kai.Lookup(ctxFor(t, 10*time.Second), "plain:http")
		return !errors.Is(err, registry.ErrPermission) || strings.Contains(err.Error(), "leases")
	})
	if err != nil || !slices.Equal(ids(list), []string{"10.8.0.1:8080"}) {
		t.Fatalf("Lookup(plain:http) with endpointslices rights only = %v, %v; want [10.8.0.1:8080]", ids(list), err)
	}
	f := follow(t, kai, "plain")
	f.waitIDs(t, "10.8.0.1:8080", "10.8.0.1:9090")

	bob := env.open(t, "bob", ns, 2*time.Second)
	var g *registry.Registration
	waitFor(t, 10*time.Second, "bob's Role to take effect", func() bool {
		g, err = bob.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "plain", ID: "r1", Addr: "10.8.0.2:80"})
		return err == nil
	})
	f.waitIDs(t, "10.8.0.1:8080", "10.8.0.1:9090", "r1")
	if got := lookupIDs(t, kai, "plain"); !slices.Equal(got, []string{"10.8.0.1:8080", "10.8.0.1:9090", "r1"}) {
		t.Fatalf("Lookup(plain) with a registered instance = %v", got)
	}
	if err := g.Deregister(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	f.waitIDs(t, "10.8.0.1:8080", "10.8.0.1:9090")
	for {
		select {
		case u := <-f.log:
			if u.Stale {
				t.Fatalf("the watcher with endpointslices rights only went stale: %v", u.Err)
			}
			continue
		default:
		}
		break
	}
}
