package k8s

import (
	"context"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/rollcall-go/rollcall/registry/driver"
)

var _ driver.ServiceLister = (*backend)(nil)

// Services lists the services of the namespace as discovery finds them:
// the kubernetes.io/service-name labels of its EndpointSlices (one list of
// the slices, and of the Leases if rollcall registered some), keeping a
// service only when Lookup of it (all ports) would find an instance: a
// ready, or serving and terminating, endpoint, in a slice whose Lease, if
// it has one, is live. A Service with no endpoints is not listed, nor one
// whose registrar's Lease expired.
func (b *backend) Services(ctx context.Context) ([]string, error) {
	if b.isCrashed() {
		return nil, errCrashed
	}
	leases, slices, state, err := b.list(ctx, LabelServiceName)
	if err != nil {
		return nil, err
	}
	by := map[string][]discoveryv1.EndpointSlice{}
	for _, es := range slices.Items {
		if svc := es.Labels[LabelServiceName]; svc != "" {
			by[svc] = append(by[svc], es)
		}
	}
	var out []string
	for svc, items := range by {
		t := target{name: svc, service: svc}
		if len(newView(b, t).reset(items, leases.Items, state == leasesForbidden)) > 0 {
			out = append(out, svc)
		}
	}
	return out, nil
}
