package k8s

import (
	"slices"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// testServices: Services lists the namespace's services that have a usable
// endpoint, registered or not, and not those of another namespace nor a
// service whose endpoints are all unready.
func testServices(t *testing.T, env *kubeEnv) {
	ns, other := env.namespace(t), env.namespace(t)
	putSlice(t, env.admin, ns, controllerSlice("web-a", "web", discoveryv1.AddressTypeIPv4, endpoint{pod: "web-1", ip: "10.9.0.1"}))
	putSlice(t, env.admin, ns, controllerSlice("idle-a", "idle", discoveryv1.AddressTypeIPv4,
		endpoint{pod: "idle-1", ip: "10.9.0.2", ready: no, serving: no, term: no}))
	putSlice(t, env.admin, other, controllerSlice("elsewhere-a", "elsewhere", discoveryv1.AddressTypeIPv4, endpoint{pod: "e-1", ip: "10.9.0.3"}))
	r := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	reg, err := r.Register(ctxFor(t, 30*time.Second), registry.Instance{Service: "reg:grpc", ID: "a", Addr: "10.9.0.4:9000"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := r.Services(ctxFor(t, 30*time.Second)); err != nil || !slices.Equal(got, []string{"reg", "web"}) {
		t.Fatalf("Services = %q, %v; want [reg web]", got, err)
	}
	if err := reg.Deregister(ctxFor(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
	if got, err := r.Services(ctxFor(t, 30*time.Second)); err != nil || !slices.Equal(got, []string{"web"}) {
		t.Fatalf("Services after Deregister = %q, %v; want [web]", got, err)
	}
}
