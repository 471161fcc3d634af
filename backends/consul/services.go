package consul

import (
	"context"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry/driver"
)

var _ driver.ServiceLister = (*backend)(nil)

// Services lists the catalog's services under the prefix (a Registry
// without one lists the names without '/'), without the registrars'
// heartbeat service SessionService. A service is left out when every
// instance of it that has checks is not passing (Consul keeps a crashed
// registrar's instances, critical, until it reaps them); one whose
// instances have no checks at all is listed. Two requests: the catalog's
// services and the health of every check.
func (b *backend) Services(ctx context.Context) ([]string, error) {
	if b.isClosed() {
		return nil, errClosed
	}
	qctx, cancel := b.bound(ctx, b.opts.RequestTimeout)
	defer cancel()
	q := (&api.QueryOptions{}).WithContext(qctx)
	names, _, err := b.c.Catalog().Services(q)
	if err != nil {
		return nil, b.wrap(ctx, "listing services", err)
	}
	checks, _, err := b.c.Health().State(api.HealthAny, q)
	if err != nil {
		return nil, b.wrap(ctx, "reading the checks", err)
	}
	// Per service name: whether it has checks, and per service ID whether
	// all of its checks pass.
	checked := map[string]bool{}
	failing := map[string]bool{} // service ID with a check not passing
	for _, c := range checks {
		if c.ServiceName != "" {
			checked[c.ServiceName] = true
			if c.Status != api.HealthPassing {
				failing[c.ServiceID] = true
			}
		}
	}
	alive := map[string]bool{}
	for _, c := range checks {
		if c.ServiceName != "" && !failing[c.ServiceID] {
			alive[c.ServiceName] = true
		}
	}
	var out []string
	for name := range names {
		svc, ok := strings.CutPrefix(name, b.prefix)
		if !ok || strings.Contains(svc, "/") || svc == SessionService || checked[name] && !alive[name] {
			continue
		}
		out = append(out, svc)
	}
	return out, nil
}
