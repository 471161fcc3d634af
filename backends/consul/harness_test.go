package consul_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

// testLogger discards log lines unless ROLLCALL_TEST_LOG is set: the suite
// provokes warnings on purpose (garbage skipped, watches failing).
func testLogger() *slog.Logger {
	if os.Getenv("ROLLCALL_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// cutTransport is an http.RoundTripper that can be cut: every request after
// cut fails, as if the process had died. It also counts requests, and
// service registrations, and can refuse writes for a while.
type cutTransport struct {
	base    *http.Transport
	cut     atomic.Bool
	count   atomic.Int64
	regs    atomic.Int64 // PUT /v1/agent/service/register sent
	refuse  atomic.Bool  // PUTs fail
	writing atomic.Int64 // PUTs in flight
	svc     atomic.Int64 // service registrations and deregistrations in flight
	svcMax  atomic.Int64 // the most svc has been
}

var (
	errCut     = errors.New("test: transport cut (process crashed)")
	errRefused = errors.New("test: writes refused")
)

func newCutTransport() *cutTransport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 64
	return &cutTransport{base: tr}
}

func (c *cutTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if c.cut.Load() {
		return nil, errCut
	}
	if req.Method == http.MethodPut {
		c.writing.Add(1)
		defer c.writing.Add(-1)
		if c.refuse.Load() {
			return nil, errRefused
		}
		if strings.HasPrefix(req.URL.Path, "/v1/agent/service/register") {
			c.regs.Add(1)
		}
		if strings.HasPrefix(req.URL.Path, "/v1/agent/service/") {
			n := c.svc.Add(1)
			defer c.svc.Add(-1)
			for m := c.svcMax.Load(); n > m && !c.svcMax.CompareAndSwap(m, n); m = c.svcMax.Load() {
			}
		}
	}
	c.count.Add(1)
	return c.base.RoundTrip(req)
}

// holdWrites makes every PUT through c (registrations, renewals) fail until
// the returned function is called. It returns once no PUT is in flight, so
// that nothing sent before can land after.
func (c *cutTransport) holdWrites(t *testing.T) (release func()) {
	t.Helper()
	c.refuse.Store(true)
	waitUntil(t, 30*time.Second, "the writes in flight to finish", func() bool { return c.writing.Load() == 0 })
	return func() { c.refuse.Store(false) }
}

// newClient returns a consul api client of addr over tr; no idle connection
// outlives the test.
func newClient(t testing.TB, addr string, tr *cutTransport) *api.Client {
	t.Helper()
	cli, err := api.NewClient(&api.Config{Address: addr, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.base.CloseIdleConnections)
	return cli
}

type harness struct {
	t     *testing.T
	srv   provider.Consul // a child process, or a container (ROLLCALL_TEST_SERVERS=containers)
	admin *api.Client     // another client, for the faults

	acl *testserver.ConsulServer // started by MakeRestrictedRegistry
}

func newHarness(ctx context.Context, t *testing.T) (conformance.Harness, error) {
	srv := provider.StartConsul(t)
	return &harness{t: t, srv: srv, admin: newClient(t, srv.Addr(), newCutTransport())}, nil
}

// hreg is a registry made by the harness, with the transport Crash cuts.
type hreg struct {
	registry.Registry
	tr *cutTransport
}

func (r *hreg) Close() error {
	err := r.Registry.Close()
	r.tr.base.CloseIdleConnections()
	return err
}

func (h *harness) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	return h.MakeRegistryIn(ctx, ttl, "")
}

// MakeRegistryIn scopes the registry with a prefix: Consul's open-source
// edition has no namespaces, and Options.Prefix is what isolates there.
func (h *harness) MakeRegistryIn(_ context.Context, ttl time.Duration, namespace string) (registry.Registry, error) {
	tr := newCutTransport()
	cli := newClient(h.t, h.srv.Addr(), tr)
	if namespace != "" {
		if err := consul.ValidatePrefix(namespace); err != nil {
			return nil, err
		}
	}
	return &hreg{Registry: consul.New(cli, &consul.Options{TTL: ttl, Prefix: namespace, Logger: testLogger()}), tr: tr}, nil
}

// MakeRestrictedRegistry returns a client, with a valid ACL token that has
// no service rights, of an agent that enforces ACLs (default deny). That
// agent is another child process, started at the first call (the harness's
// own agent runs without ACLs, so that the other subtests need no token);
// the harness itself uses its management token.
func (h *harness) MakeRestrictedRegistry(_ context.Context, ttl time.Duration) (registry.Registry, error) {
	if _, err := testserver.Binary("consul"); err != nil {
		return nil, fmt.Errorf("%w: the ACL agent is a child process: %v", conformance.ErrUnsupported, err)
	}
	if h.acl == nil {
		h.acl = testserver.StartConsulServerWith(h.t, testserver.ConsulServerOptions{ACL: true})
	}
	token := h.acl.NewToken(fmt.Sprintf("restricted-%d", time.Now().UnixNano()), `key_prefix "rollcall-test/" { policy = "read" }`)
	tr := newCutTransport()
	cli, err := api.NewClient(&api.Config{Address: h.acl.Addr(), Token: token, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		return nil, err
	}
	h.t.Cleanup(tr.base.CloseIdleConnections)
	return &hreg{Registry: consul.New(cli, &consul.Options{TTL: ttl, Logger: testLogger()}), tr: tr}, nil
}

// Crash cuts the registry's transport: no renewal, no deregistration
// reaches the agent any more. Its Close then only stops its goroutines.
func (h *harness) Crash(r registry.Registry) error {
	hr := r.(*hreg)
	hr.tr.cut.Store(true)
	_ = hr.Close() // its deregistrations fail: the process is "dead"
	return nil
}

func (h *harness) URLs() (string, []string) {
	a := h.srv.Addr()
	return "consul://" + a + "/?ttl=2s&wait=3s", []string{
		"consul://" + a + "/?ttl=banana",
		"consul://" + a + "/?ttl=-1s",
		"consul://" + a + "/?wait=0s",
		"consul://" + a + "/?unknown=1",
		"consul://" + a + "/?token=hunter2&bogus=1",
		"consul://" + a + "/?token=hunter2&ttl=1s&ttl=2s",
		"consul://" + a + "/bad~prefix",
		"consul://" + a + "/team-a//x",
		"consul://" + a + "/?tls=maybe",
		"consul://" + a + "/?tls=false&ca_file=/ca.pem",
		"consul://" + a + "/?cert_file=/c.pem",
		"consul://" + a + "/?deregister_after=10s",
		"consul://user:s3cret@" + a + "/?ttl=banana",
		"consul://127.0.0.1:1,127.0.0.1:2/",
		"consul://%zz",
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

// RevokeLeases deregisters every TTL check of the agent behind the
// registrars' backs: the registrars' next renewal finds them unknown.
func (h *harness) RevokeLeases(ctx context.Context) error {
	checks, err := h.admin.Agent().ChecksWithFilterOpts(`Type == "ttl"`, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return err
	}
	for id := range checks {
		if err := h.admin.Agent().CheckDeregisterOpts(id, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
			return err
		}
	}
	return nil
}

// DeleteInstance deregisters the instance's service from the agent, as
// another client would (the Consul service ID is "service~id").
func (h *harness) DeleteInstance(ctx context.Context, service, id string) error {
	return h.admin.Agent().ServiceDeregisterOpts(service+"~"+id, (&api.QueryOptions{}).WithContext(ctx))
}

// WriteGarbage registers services under the name service that are not
// valid instances. They have no check, so they are passing.
func (h *harness) WriteGarbage(ctx context.Context, service string) error {
	bad := []*api.AgentServiceRegistration{
		{ID: service + "~no-port", Name: service, Address: "127.0.0.1"},
		{ID: "bad id with spaces", Name: service, Address: "127.0.0.1", Port: 80},
		{ID: service + "~bad-host", Name: service, Address: "not a host!", Port: 80},
		{ID: service + "~ctl-meta", Name: service, Address: "127.0.0.1", Port: 81, Meta: map[string]string{"k": "a\x01b"}},
		{ID: service + "~", Name: service, Address: "127.0.0.1", Port: 82},
	}
	for _, reg := range bad {
		opts := api.ServiceRegisterOpts{}.WithContext(ctx)
		if err := h.admin.Agent().ServiceRegisterOpts(reg, opts); err != nil {
			return fmt.Errorf("registering garbage %q: %w", reg.ID, err)
		}
	}
	return nil
}

func (h *harness) Close() {}
