package consul_test

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// cutAfterRegister is a cutTransport that, once armed, lets the next service
// registration through and then cuts itself: the agent has the registration,
// the registrar hears nothing more.
type cutAfterRegister struct {
	*cutTransport
	armed atomic.Bool
}

func (c *cutAfterRegister) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.cutTransport.RoundTrip(req)
	if req.Method == http.MethodPut && strings.HasPrefix(req.URL.Path, "/v1/agent/service/register") && c.armed.CompareAndSwap(true, false) {
		c.cut.Store(true)
	}
	return resp, err
}

// TestFailedRegisterLeavesNoRegistration: a Register that fails after its
// registration reached the agent (here the catalog check gets no answer)
// leaves nothing behind once the agent can be reached again: nobody holds a
// Registration to deregister it, and it would alias the live session. The
// other registration of the registrar is untouched.
func TestFailedRegisterLeavesNoRegistration(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	tr := &cutAfterRegister{cutTransport: newCutTransport()}
	cli, err := api.NewClient(&api.Config{Address: srv.Addr(), HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.base.CloseIdleConnections)
	admin := newClient(t, srv.Addr(), newCutTransport())
	r := consul.New(cli, &consul.Options{TTL: 3 * time.Second, Logger: testLogger()})
	t.Cleanup(func() { _ = r.Close() })
	a, err := r.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "abandon", ID: "a", Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	has := func(sid string) bool {
		t.Helper()
		services, err := admin.Agent().ServicesWithFilterOpts("", qopts(t))
		if err != nil {
			t.Fatal(err)
		}
		_, ok := services[sid]
		return ok
	}
	tr.armed.Store(true)
	if _, err := r.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "abandon", ID: "b", Addr: "127.0.0.1:9002"}); err == nil {
		t.Fatal("Register with the transport cut after the registration: no error")
	}
	if !has("abandon~b") {
		t.Fatal("the agent does not have the registration of the failed Register: the test did not cut where it meant to")
	}
	tr.cut.Store(false)
	waitUntil(t, 10*time.Second, "the registration of the failed Register to be removed from the agent", func() bool {
		return !has("abandon~b")
	})
	if !has("abandon~a") {
		t.Fatal("the other registration was removed too")
	}
	if s := a.Status(); s.State != registry.Registered || s.Reregistrations != 0 {
		t.Fatalf("the other registration: %+v; want registered, never registered again", s)
	}
}
