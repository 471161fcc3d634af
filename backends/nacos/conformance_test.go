package nacos_test

import (
	"context"

	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// testPushDelay is the server's push merge window in the tests (Nacos'
// default is 500 ms; shorter keeps the suite quick, and much shorter makes
// the 500-instance burst spend its time decoding pushes).
const testPushDelay = 200 * time.Millisecond

type harness struct {
	t   *testing.T
	srv provider.Nacos // in process, or a container (ROLLCALL_TEST_SERVERS=containers)
	dir string

	mu   sync.Mutex
	made []registry.Registry // every registry made, closed by Close
}

func newHarness(ctx context.Context, t *testing.T) (conformance.Harness, error) {
	srv := provider.StartNacos(t)
	srv.SetPushDelay(testPushDelay)
	return &harness{t: t, srv: srv, dir: testutil.TempDir(t)}, nil
}

// newClient makes an SDK client of the harness's server.
func (h *harness) newClient() (*nacos.Client, error) {
	cli, err := nacos.NewClient(nacos.ClientOptions{Servers: []string{h.srv.Addr()}, Timeout: 3 * time.Second, CacheDir: h.dir})
	if err != nil {
		return nil, err
	}
	return cli, nil
}

// ownedRegistry is a Registry over a client of the harness's, which its
// Close also closes, as a process's exit would.
type ownedRegistry struct {
	registry.Registry
	cli *nacos.Client
}

func (r ownedRegistry) Close() error {
	err := r.Registry.Close()
	r.cli.CloseClient()
	return err
}

func (h *harness) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	cli, err := h.newClient()
	if err != nil {
		return nil, err
	}
	r, err := nacos.New(cli, &nacos.Options{TTL: ttl})
	if err != nil {
		cli.CloseClient()
		return nil, err
	}
	return h.keep(ownedRegistry{r, cli}), nil
}

// ServicesOutliveInstances: Nacos keeps a service whose instances are gone
// until its empty service cleaner removes it (the protocol server until it
// restarts).
func (h *harness) ServicesOutliveInstances() bool { return true }

// keep notes r for Close.
func (h *harness) keep(r registry.Registry) registry.Registry {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.made = append(h.made, r)
	return r
}

var _ conformance.NamespaceMaker = (*harness)(nil)

// MakeRegistryIn makes a registry in a Nacos namespace (the SDK client's
// namespace id): services of one namespace never see another's.
func (h *harness) MakeRegistryIn(ctx context.Context, ttl time.Duration, namespace string) (registry.Registry, error) {
	cli, err := nacos.NewClient(nacos.ClientOptions{Servers: []string{h.srv.Addr()}, Namespace: namespace, Timeout: 3 * time.Second, CacheDir: h.dir})
	if err != nil {
		return nil, err
	}
	r, err := nacos.New(cli, &nacos.Options{TTL: ttl})
	if err != nil {
		cli.CloseClient()
		return nil, err
	}
	return h.keep(ownedRegistry{r, cli}), nil
}

// Crash closes the SDK client without deregistering anything: its
// connection closes and the server drops its ephemeral instances, as when
// the process dies.
func (h *harness) Crash(r registry.Registry) error {
	if raceChild() {
		_ = r.Close() // the suite skips the test, leaving r to us
		return errRaceSDK
	}
	or, ok := r.(ownedRegistry)
	if !ok {
		return fmt.Errorf("Crash of a registry the harness did not make: %T", r)
	}
	or.cli.CloseClient()
	_ = or.Registry.Close() // its deregistrations fail: the client is closed
	return nil
}

func (h *harness) URLs() (string, []string) {
	a := h.srv.Addr()
	return "nacos://" + a + "/?ttl=2s&timeout=3s", []string{
		"nacos://" + a + "/?ttl=banana",
		"nacos://" + a + "/?ttl=-1s",
		"nacos://" + a + "/?unknown=1",
		"nacos://" + a + "/?cluster=not_valid",
		"nacos://" + a + "/?group=a@@b",
		"nacos://" + a + "/a/path",
		"nacos://user:s3cret@" + a + "/?bogus=1",
		"nacos://user:hunter2@" + a + "/x",
		"nacos://%zz",
		"nacos:///",
	}
}

// The fault controls that make the SDK reconnect are refused under -race
// (see child_test.go) and run in TestConformanceWithoutRace.

func (h *harness) PauseServer(context.Context) error {
	if raceChild() {
		return errRaceSDK
	}
	h.srv.Pause()
	return nil
}

func (h *harness) ResumeServer(context.Context) error { h.srv.Resume(); return nil }

func (h *harness) StopServer(context.Context) error {
	if raceChild() {
		return errRaceSDK
	}
	h.srv.Stop()
	return nil
}

func (h *harness) StartServer(_ context.Context, wipe bool) error {
	if wipe {
		h.srv.Restart(true) // starts the stopped server with no data
	} else {
		h.srv.Start()
	}
	return nil
}

// RevokeLeases: a Nacos 2.x registration's lease is its client's connection;
// the server closing every connection ends them all.
func (h *harness) RevokeLeases(context.Context) error {
	if raceChild() {
		return errRaceSDK
	}
	h.srv.DropConnections()
	return nil
}

func (h *harness) DeleteInstance(context.Context, string, string) error {
	return fmt.Errorf("%w: a Nacos 2.x ephemeral instance can only be removed by the connection that registered it "+
		"(a deregistration from another client is a no-op on the server); RevokeLeases covers the loss of the connection", conformance.ErrUnsupported)
}

func (h *harness) WriteGarbage(_ context.Context, service string) error {
	ok := func(ip string, port uint64, md map[string]string) model.Instance {
		return model.Instance{Ip: ip, Port: port, Weight: 1, Enable: true, Healthy: true, Ephemeral: true, Metadata: md}
	}
	h.srv.Inject("", "", service, ok("127.0.0.1", 0, map[string]string{nacos.MetaID: "no-port"}))
	h.srv.Inject("", "", service, ok("127.0.0.1", 7001, map[string]string{nacos.MetaID: "bad/id"}))
	h.srv.Inject("", "", service, ok("not an ip", 7002, map[string]string{nacos.MetaID: "bad-host"}))
	h.srv.Inject("", "", service, ok("127.0.0.1", 7003, map[string]string{nacos.MetaID: "bad-weight", registry.MetaWeight: "-5"}))
	h.srv.Inject("", "", service, ok("127.0.0.1", 7004, map[string]string{nacos.MetaID: "bad-meta", "a key": "v"}))
	return nil
}

// Close closes every registry the harness made (Close is idempotent): a
// subtest that is skipped or fails before its own cleanup would otherwise
// leave an SDK client that keeps reconnecting to the server the subtest
// stops at its end, in whatever test runs next (under -race, the SDK's
// reconnect path has races of its own; see child_test.go).
func (h *harness) Close() {
	h.mu.Lock()
	made := h.made
	h.made = nil
	h.mu.Unlock()
	for _, r := range made {
		_ = r.Close()
	}
}

func TestConformance(t *testing.T) {
	conformance.RunConformanceTests(t, newHarness)
}

// RegistrationsAreConnectionBound: Nacos 2.x ephemeral instances belong to
// the SDK's connection, so a restarted server lists them only once each
// client has reconnected and redone its registrations.
func (h *harness) RegistrationsAreConnectionBound() bool { return true }
