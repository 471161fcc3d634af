package conformance

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/rollcall-go/rollcall/registry"
)

// testServices checks Registry.Services: the services registered are
// listed, with the counts Lookup gives; a service whose last instance is
// deregistered is no longer listed (unless the harness says its server
// keeps empty services, ServicesOutliveInstances); a client scoped to another namespace
// lists none of them.
func testServices(t *testing.T, h Harness) {
	r := open(t, h)
	if _, err := r.Services(ctxT(t)); errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("the backend cannot list services: %v", err)
	}
	a, b := service("listed-a"), service("listed-b")
	register(t, r, instFor(h, a, "1", 9001))
	register(t, r, instFor(h, a, "2", 9002))
	rb := register(t, r, instFor(h, b, "1", 9003))
	// The server may hold other subtests' services: look only at ours.
	counts := func(reg registry.Registry) (map[string]int, error) {
		names, err := reg.Services(ctxT(t))
		if err != nil {
			return nil, err
		}
		if !slices.IsSorted(names) {
			return nil, fmt.Errorf("Services = %v, not sorted", names)
		}
		out := map[string]int{}
		for _, n := range names {
			if n == a || n == b {
				list, err := reg.Lookup(ctxT(t), n)
				if err != nil {
					return nil, err
				}
				out[n] = len(list)
			}
		}
		return out, nil
	}
	// Another client lists them too (Register returns once visible; a
	// backend's service catalog may follow a moment later).
	r2 := open(t, h)
	var got map[string]int
	var err error
	waitFor(t, settle, "both services listed with their counts", func() bool {
		got, err = counts(r2)
		return err == nil && got[a] == 2 && got[b] == 1
	})
	if err := rb.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if so, ok := h.(ServicesOutliveInstances); ok && so.ServicesOutliveInstances() {
		// Deregister returns once the server has it; another client's view
		// follows (a CI run: Nacos' push to r2 had not arrived yet).
		waitFor(t, settle, fmt.Sprintf("Lookup(%s) through another client to be empty after its last Deregister", b), func() bool {
			ids := lookupIDsQuiet(r2, b)
			return ids != nil && len(ids) == 0
		})
	} else {
		waitFor(t, settle, "the service whose last instance is gone to be unlisted", func() bool {
			got, err = counts(r2)
			_, listed := got[b]
			return err == nil && !listed && got[a] == 2
		})
	}
	if nm, ok := h.(NamespaceMaker); ok {
		other, err := nm.MakeRegistryIn(ctxT(t), TTL, "team-services")
		skipIfUnsupported(t, err)
		t.Cleanup(func() { _ = other.Close() })
		got, err := counts(other)
		if err != nil || len(got) != 0 {
			t.Fatalf("Services in another namespace: %v, %v; want neither %s nor %s", got, err, a, b)
		}
	}
}
