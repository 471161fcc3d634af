package consul_test

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// tokenClient returns a client of addr with token; no idle connection
// outlives the test.
func tokenClient(t *testing.T, addr, token string) *api.Client {
	t.Helper()
	tr := newCutTransport()
	cli, err := api.NewClient(&api.Config{Address: addr, Token: token, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.base.CloseIdleConnections)
	return cli
}

// tokenRegistry returns a Registry over a client of srv with token.
func tokenRegistry(t *testing.T, srv *testserver.ConsulServer, token string, o consul.Options) (registry.Registry, *api.Client) {
	t.Helper()
	cli := tokenClient(t, srv.Addr(), token)
	if o.Logger == nil {
		o.Logger = testLogger()
	}
	r := consul.New(cli, &o)
	t.Cleanup(func() { _ = r.Close() })
	return r, cli
}

// ACL refusals are registry.ErrPermission, not outages: a valid token with
// no service rights, an unknown token, and a token deleted while its
// registrar renews.
func TestPermissionDeniedIsReported(t *testing.T) {
	srv := testserver.StartConsulServerWith(t, testserver.ConsulServerOptions{ACL: true})
	mgmt := srv.ManagementToken()
	admin, _ := tokenRegistry(t, srv, mgmt, consul.Options{TTL: 2 * time.Second})
	if _, err := admin.Register(ctxFor(t, 10*time.Second), instance("acl-full", "a", 9001)); err != nil {
		t.Fatalf("Register with the management token: %v", err)
	}
	restricted := srv.NewToken("nothing", `key_prefix "rollcall-test/" { policy = "read" }`)
	unknown := "0badc0de-0000-4000-8000-000000000000"
	perm := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) {
			t.Errorf("%s: %v, want ErrPermission (and not ErrUnavailable)", what, err)
		} else {
			t.Logf("%s: %v", what, err)
		}
	}
	for _, tc := range []struct{ name, token string }{{"no-rights", restricted}, {"unknown-token", unknown}} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := tokenRegistry(t, srv, tc.token, consul.Options{TTL: 2 * time.Second})
			_, err := r.Register(ctxFor(t, 10*time.Second), instance("acl-new", "b", 9002))
			perm("Register", err)
			_, err = r.Lookup(ctxFor(t, 10*time.Second), "acl-full") // has an instance the token may not read
			perm("Lookup of a service with instances", err)
			_, err = r.Lookup(ctxFor(t, 10*time.Second), "acl-empty") // has none
			perm("Lookup of a service without instances", err)
			for _, svc := range []string{"acl-full", "acl-empty"} {
				ch := watchUpdates(t, r, svc)
				u := nextUpdate(t, ch, 10*time.Second, "the first update", func(registry.Update) bool { return true })
				if !u.Stale || u.Synced || len(u.Instances()) != 0 {
					t.Errorf("first update of a watch of %s: %+v, want stale, not synced", svc, u)
				}
				perm("the first watch update of "+svc, u.Err)
			}
			err = r.Ping(ctxFor(t, 10*time.Second))
			if tc.token == unknown {
				perm("Ping", err)
			} else if err != nil {
				// A known token passes Ping: rights are per service.
				t.Errorf("Ping with a known token that may do nothing: %v", err)
			}
		})
	}

	// A token deleted while its registrar holds registrations: the
	// renewal is refused, and the registration says so.
	writer := srv.NewToken("writer", `service_prefix "" { policy = "write" } node_prefix "" { policy = "read" }`)
	r, cli := tokenRegistry(t, srv, writer, consul.Options{TTL: 2 * time.Second})
	reg, err := r.Register(ctxFor(t, 10*time.Second), instance("acl-w", "c", 9003))
	if err != nil {
		t.Fatalf("Register with a writer token: %v", err)
	}
	self, _, err := cli.ACL().TokenReadSelf(qopts(t))
	if err != nil {
		t.Fatal(err)
	}
	mcli := tokenClient(t, srv.Addr(), mgmt)
	if _, err := mcli.ACL().TokenDelete(self.AccessorID, (&api.WriteOptions{}).WithContext(ctxFor(t, 10*time.Second))); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the registration to report the refusal", func() bool {
		s := reg.Status()
		return s.State == registry.Retrying && errors.Is(s.Err, registry.ErrPermission)
	})
	s := reg.Status()
	t.Logf("after the token was deleted: %+v", s)
	if errors.Is(s.Err, registry.ErrUnavailable) {
		t.Errorf("status error %v is an outage", s.Err)
	}
}
