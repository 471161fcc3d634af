package etcd_test

import (
	"context"
	"net/url"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

type harness struct {
	t      *testing.T
	layout etcd.Layout   // "" for the default (rollcall's)
	srv    provider.Etcd // a child process, or a container (ROLLCALL_TEST_SERVERS=containers)
	admin  *clientv3.Client

	secured provider.Etcd // a second server, with authentication on, made by MakeRestrictedRegistry
}

var (
	_ conformance.NamespaceMaker  = (*harness)(nil)
	_ conformance.RestrictedMaker = (*harness)(nil)
	_ conformance.AddressOnly     = (*harness)(nil)
)

// InstancesAreAddressOnly: go-zero's values are a plain host:port.
func (h *harness) InstancesAreAddressOnly() bool { return h.layout == etcd.LayoutGoZero }

// clientRegistry is a Registry made with etcd.New that also closes the
// client it was given, as a process that exits would.
type clientRegistry struct {
	registry.Registry
	cli *clientv3.Client
}

func (r *clientRegistry) Close() error {
	err := r.Registry.Close()
	r.cli.Close()
	return err
}

// clientConfig is the configuration of the test's clients: the one the
// etcd:// opener uses (etcd.Configure), with a quiet logger.
func clientConfig(ep string) clientv3.Config {
	cfg := clientv3.Config{Endpoints: []string{ep}, Logger: zap.NewNop()}
	etcd.Configure(&cfg)
	return cfg
}

func newClient(t testing.TB, ep string) *clientv3.Client {
	cli, err := clientv3.New(clientConfig(ep))
	if err != nil {
		t.Fatal(err)
	}
	return cli
}

func newHarness(ctx context.Context, t *testing.T) (conformance.Harness, error) {
	return newLayoutHarness("")(ctx, t)
}

// newLayoutHarness makes harnesses whose registries use layout.
func newLayoutHarness(layout etcd.Layout) conformance.HarnessMaker {
	return func(ctx context.Context, t *testing.T) (conformance.Harness, error) {
		if layout != "" && provider.Containers(t) {
			t.Skip("the layouts run in the child-process pass (ROLLCALL_TEST_SERVERS unset): a layout is a codec, the server is the same")
		}
		srv := provider.StartEtcd(t)
		return &harness{t: t, layout: layout, srv: srv, admin: newClient(t, srv.Endpoint())}, nil
	}
}

// dir is the key directory of service in the harness's layout.
func (h *harness) dir(service string) string {
	switch h.layout {
	case etcd.LayoutGoZero:
		return etcd.DefaultGoZeroPrefix + service + "/"
	case etcd.LayoutKratos:
		return etcd.DefaultKratosPrefix + service + "/"
	}
	return etcd.DefaultPrefix + service + "/"
}

// query is the layout parameter of the harness's URLs ("&layout=..."), empty
// for the default layout.
func (h *harness) query() string {
	if h.layout == "" {
		return ""
	}
	return "&layout=" + string(h.layout)
}

func (h *harness) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	cli := newClient(h.t, h.srv.Endpoint())
	r, err := etcd.New(cli, &etcd.Options{TTL: ttl, Layout: h.layout})
	if err != nil {
		return nil, err
	}
	return &clientRegistry{Registry: r, cli: cli}, nil
}

// MakeRegistryIn makes a registry whose URL path is the namespace: its
// keys live under /rollcall/<namespace>/.
func (h *harness) MakeRegistryIn(ctx context.Context, ttl time.Duration, namespace string) (registry.Registry, error) {
	return registry.Open(ctx, "etcd://"+h.srv.Endpoint()+"/"+url.PathEscape(namespace)+"?ttl="+ttl.String()+h.query())
}

// MakeRestrictedRegistry makes a registry that logs in as a user whose only
// role reads and writes another prefix, on a second etcd with
// authentication enabled (enabling it on the harness's server would lock
// out its other clients).
func (h *harness) MakeRestrictedRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	if h.secured == nil {
		h.secured = provider.StartEtcd(h.t)
		enableAuth(h.t, h.secured.Endpoint(), "rootpw", "nobodypw")
	}
	return registry.Open(ctx, "etcd://nobody:nobodypw@"+h.secured.Endpoint()+"/?ttl="+ttl.String()+h.query())
}

// Crash closes the client under the registry first, so nothing is revoked.
func (h *harness) Crash(r registry.Registry) error {
	cr := r.(*clientRegistry)
	cr.cli.Close()
	cr.Registry.Close()
	return nil
}

func (h *harness) URLs() (string, []string) {
	ep := h.srv.Endpoint()
	return "etcd://" + ep + "/?ttl=2s" + h.query(), []string{
		"etcd:///?ttl=2s",
		"etcd://" + ep + "/?ttl=banana",
		"etcd://" + ep + "/?ttl=0s",
		"etcd://" + ep + "/?unknown=1",
		"etcd://" + ep + "/a//b",
		"etcd://" + ep + "/../x",
		"etcd://127.0.0.1/",
		"etcd://" + ep + "/?cert=only-cert.pem",
		"etcd://" + ep + "/?ca=/nonexistent/ca.pem",
		"etcd://root:s3cret@" + ep + "/?bogus=1",
		"etcd://root:hunter2@127.0.0.1:x:y/",
		"etcd://" + ep + "/?layout=zookeeper",
		"etcd://" + ep + "/?kratos-scheme=grpc",
	}
}

func (h *harness) PauseServer(context.Context) error  { h.srv.Pause(); return nil }
func (h *harness) ResumeServer(context.Context) error { h.srv.Resume(); return nil }
func (h *harness) StopServer(context.Context) error   { h.srv.Stop(); return nil }
func (h *harness) StartServer(_ context.Context, wipe bool) error {
	if wipe {
		h.srv.Wipe()
	}
	h.srv.Start()
	return nil
}

func (h *harness) RevokeLeases(ctx context.Context) error {
	ls, err := h.admin.Leases(ctx)
	if err != nil {
		return err
	}
	for _, l := range ls.Leases {
		if _, err := h.admin.Revoke(ctx, l.ID); err != nil {
			return err
		}
	}
	return nil
}

func (h *harness) DeleteInstance(ctx context.Context, service, id string) error {
	_, err := h.admin.Delete(ctx, h.dir(service)+id)
	return err
}

func (h *harness) WriteGarbage(ctx context.Context, service string) error {
	dir := h.dir(service)
	garbage := map[string]string{
		dir + "not-json":    "{{{",
		dir + "bad-addr":    `{"Addr":"nowhere"}`,
		dir + "empty":       ``,
		dir + "nested/deep": `{"Addr":"127.0.0.1:1"}`,
		dir + "bad id!":     `{"Addr":"127.0.0.1:1"}`,
		dir + "weight":      `{"Addr":"127.0.0.1:1","Metadata":{"weight":"lots"}}`,
	}
	switch h.layout {
	case etcd.LayoutGoZero:
		garbage = map[string]string{
			dir + "bad-addr":    "nowhere",
			dir + "empty":       "",
			dir + "nested/deep": "127.0.0.1:1",
			dir + "bad id!":     "127.0.0.1:1",
			dir + "json":        `{"Addr":"127.0.0.1:1"}`,
		}
	case etcd.LayoutKratos:
		garbage = map[string]string{
			dir + "not-json":      "{{{",
			dir + "empty":         ``,
			dir + "bad-addr":      `{"id":"bad-addr","name":"` + service + `","endpoints":["grpc://nowhere"]}`,
			dir + "http-only":     `{"id":"http-only","name":"` + service + `","endpoints":["http://127.0.0.1:1"]}`,
			dir + "other-service": `{"id":"other-service","name":"x` + service + `","endpoints":["grpc://127.0.0.1:1"]}`,
			dir + "nested/deep":   `{"id":"deep","name":"` + service + `","endpoints":["grpc://127.0.0.1:1"]}`,
			dir + "weight":        `{"id":"weight","name":"` + service + `","metadata":{"weight":"lots"},"endpoints":["grpc://127.0.0.1:1"]}`,
		}
	}
	for k, v := range garbage {
		if _, err := h.admin.Put(ctx, k, v); err != nil {
			return err
		}
	}
	return nil
}

func (h *harness) Close() { h.admin.Close() }

func TestConformance(t *testing.T) {
	conformance.RunConformanceTests(t, newHarness)
}

// TestConformanceGoZeroLayout runs the suite on go-zero's keys and values,
// which hold an address only: the suite registers no metadata and skips
// what is about metadata (AddressOnly).
func TestConformanceGoZeroLayout(t *testing.T) {
	conformance.RunConformanceTests(t, newLayoutHarness(etcd.LayoutGoZero))
}

// TestConformanceKratosLayout runs the suite on kratos' keys and values
// (the cluster properties run with the default layout only: a layout is a
// codec, the machinery they test is the same).
func TestConformanceKratosLayout(t *testing.T) {
	conformance.RunConformanceTests(t, newLayoutHarness(etcd.LayoutKratos))
}
