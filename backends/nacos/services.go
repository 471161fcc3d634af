package nacos

import (
	"context"
	"fmt"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/registry/driver"
)

var _ driver.ServiceLister = (*backend)(nil)

// servicesPageSize is how many names one page of the server's service list
// holds.
const servicesPageSize = 500

// Services lists the services of the registry's namespace and group, as
// the server's service list has them (the SDK's GetAllServicesInfo, paged).
// The server keeps a service whose instances are all gone until its empty
// service cleaner removes it (a minute or more on Nacos 2.x), so such a
// service can be listed; Lookup then finds no instance.
func (b *backend) Services(ctx context.Context) ([]string, error) {
	cli, err := b.client(ctx)
	if err != nil {
		return nil, err
	}
	type result struct {
		names []string
		err   error
	}
	res := make(chan result, 1)
	if !b.spawn(func() { n, err := b.serviceNames(cli); res <- result{n, err} }) {
		return nil, errClosed
	}
	select {
	case r := <-res:
		return r.names, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (b *backend) serviceNames(cli naming_client.INamingClient) ([]string, error) {
	var out []string
	for page := uint32(1); ; page++ {
		l, err := cli.GetAllServicesInfo(vo.GetAllServiceInfoParam{GroupName: b.group, PageNo: page, PageSize: servicesPageSize})
		if err != nil {
			return nil, fmt.Errorf("%w: nacos: listing services: %w", sdkErrKind(err), err)
		}
		out = append(out, l.Doms...)
		if len(l.Doms) < servicesPageSize || int64(len(out)) >= l.Count {
			return out, nil
		}
	}
}
