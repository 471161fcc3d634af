package memory_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type harness struct {
	name string
	srv  *memory.Server
}

var seq atomic.Int64

var (
	_ conformance.NamespaceMaker  = (*harness)(nil)
	_ conformance.RestrictedMaker = (*harness)(nil)
)

func newHarness(ctx context.Context, t *testing.T) (conformance.Harness, error) {
	name := fmt.Sprintf("conformance-%d", seq.Add(1))
	return &harness{name: name, srv: memory.NamedServer(name)}, nil
}

func (h *harness) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	return memory.New(h.srv, &memory.Options{TTL: ttl}), nil
}

// MakeRegistryIn makes a client in a namespace of the same server.
func (h *harness) MakeRegistryIn(ctx context.Context, ttl time.Duration, namespace string) (registry.Registry, error) {
	return memory.New(h.srv, &memory.Options{TTL: ttl, Namespace: namespace}), nil
}

// MakeRestrictedRegistry makes a client as a user the server restricts.
func (h *harness) MakeRestrictedRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	h.srv.Restrict("no-rights")
	return memory.New(h.srv, &memory.Options{TTL: ttl, User: "no-rights"}), nil
}

func (h *harness) Crash(r registry.Registry) error {
	r.(*memory.Registry).Crash()
	return nil
}

func (h *harness) URLs() (string, []string) {
	return "mem://" + h.name + "?ttl=2s", []string{
		"mem://" + h.name + "?ttl=banana",
		"mem://" + h.name + "?ttl=-1s",
		"mem://" + h.name + "?unknown=1",
		"mem://" + h.name + "/path",
		"mem://user:s3cret@" + h.name,
		"mem://%zz",
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
func (h *harness) RevokeLeases(context.Context) error { h.srv.RevokeLeases(); return nil }
func (h *harness) DeleteInstance(_ context.Context, service, id string) error {
	h.srv.Delete(service, id)
	return nil
}
func (h *harness) WriteGarbage(_ context.Context, service string) error {
	h.srv.Put(driver.Instance{Service: service, ID: "no-port", Addr: "127.0.0.1"})
	h.srv.Put(driver.Instance{Service: service, ID: "bad/id", Addr: "127.0.0.1:80"})
	h.srv.Put(driver.Instance{Service: "other", ID: "wrong-service", Addr: "127.0.0.1:80"})
	return nil
}
func (h *harness) Close() {}

func TestConformance(t *testing.T) {
	conformance.RunConformanceTests(t, newHarness)
}
