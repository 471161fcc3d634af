package etcd_test

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

// TestLayoutKeysAndValues: each layout, from the URL and from Options,
// writes the keys and values of its framework, under the root its URL path
// gives, and reads them back as the instance it registered.
func TestLayoutKeysAndValues(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := provider.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	plain := registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9001"}
	withMD := registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9001", Metadata: map[string]string{"zone": "z1", registry.MetaVersion: "v1"}}
	for _, tc := range []struct {
		path   string // URL path and query
		opts   *etcd.Options
		in     registry.Instance
		key    string
		value  string
		others []string // the services Services lists besides user.rpc
	}{
		{path: "/", in: withMD, key: "/rollcall/user.rpc/a", value: `{"Addr":"127.0.0.1:9001","Metadata":{"version":"v1","zone":"z1"}}`},
		{path: "/?layout=rollcall", in: plain, key: "/rollcall/user.rpc/a", value: `{"Addr":"127.0.0.1:9001"}`},
		{path: "/?layout=gozero", in: plain, key: "user.rpc/a", value: "127.0.0.1:9001"},
		{path: "/team-a/x?layout=gozero", in: plain, key: "team-a/x/user.rpc/a", value: "127.0.0.1:9001"},
		{opts: &etcd.Options{Layout: etcd.LayoutGoZero, Prefix: "/svc"}, in: plain, key: "/svc/user.rpc/a", value: "127.0.0.1:9001"},
		{path: "/?layout=kratos", in: withMD, key: "/microservices/user.rpc/a",
			value: `{"id":"a","name":"user.rpc","version":"v1","metadata":{"zone":"z1"},"endpoints":["grpc://127.0.0.1:9001"]}`},
		{path: "/ns?layout=kratos&kratos-scheme=http", in: plain, key: "/ns/user.rpc/a",
			value: `{"id":"a","name":"user.rpc","version":"","metadata":null,"endpoints":["http://127.0.0.1:9001"]}`},
		{opts: &etcd.Options{Layout: etcd.LayoutKratos}, in: plain, key: "/microservices/user.rpc/a",
			value: `{"id":"a","name":"user.rpc","version":"","metadata":null,"endpoints":["grpc://127.0.0.1:9001"]}`},
	} {
		name := tc.path
		var r registry.Registry
		var err error
		if tc.opts != nil {
			name = string(tc.opts.Layout) + " " + tc.opts.Prefix
			r, err = etcd.New(admin, tc.opts)
		} else {
			r, err = registry.Open(ctx, "etcd://"+srv.Endpoint()+tc.path)
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := r.Register(ctx, tc.in); err != nil {
			t.Fatalf("%s: Register: %v", name, err)
		}
		resp, err := admin.Get(ctx, tc.key)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != tc.value {
			t.Errorf("%s: etcd holds %v at %s (%v); want %s", name, resp.Kvs, tc.key, err, tc.value)
		}
		list, err := r.Lookup(ctx, "user.rpc")
		if err != nil || len(list) != 1 || !list[0].Equal(tc.in) {
			t.Errorf("%s: Lookup = %v, %v; want %v", name, list, err, tc.in)
		}
		if svcs, err := r.Services(ctx); err != nil || !slices.Contains(svcs, "user.rpc") {
			t.Errorf("%s: Services = %v, %v", name, svcs, err)
		}
		if err := r.Ping(ctx); err != nil {
			t.Errorf("%s: Ping: %v", name, err)
		}
		if err := r.Close(); err != nil {
			t.Errorf("%s: Close: %v", name, err)
		}
		if resp, err := admin.Get(ctx, tc.key, clientv3.WithCountOnly()); err != nil || resp.Count != 0 {
			t.Errorf("%s: the key is left after Close (%v)", name, err)
		}
	}
}

// TestKratosLayoutReadsKratosInstances: the address is the first endpoint
// of the scheme; an instance without one, or of another service, is
// skipped; the version field becomes registry.MetaVersion.
func TestKratosLayoutReadsKratosInstances(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := provider.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	for k, v := range map[string]string{
		"/microservices/hello/k1": `{"id":"k1","name":"hello","version":"v3","metadata":{"weight":"2"},"endpoints":["http://127.0.0.1:8000","grpc://127.0.0.1:9000?isSecure=false","grpc://127.0.0.1:9009"]}`,
		"/microservices/hello/k2": `{"id":"k2","name":"hello","endpoints":["http://127.0.0.1:8001"]}`,
		"/microservices/hello/k3": `{"id":"k3","name":"hello2","endpoints":["grpc://127.0.0.1:9003"]}`,
	} {
		if _, err := admin.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	r, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+"/?layout=kratos")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	list, err := r.Lookup(ctx, "hello")
	if err != nil || len(list) != 1 || list[0].ID != "k1" || list[0].Addr != "127.0.0.1:9000" ||
		!maps.Equal(list[0].Metadata, map[string]string{"weight": "2", registry.MetaVersion: "v3"}) {
		t.Fatalf("Lookup = %+v, %v", list, err)
	}
}

// TestGoZeroLayoutRefusesMetadata: go-zero's values are the address alone,
// so an instance with metadata is an ErrInvalidInstance, not registered,
// never retried, nothing written. (And New refuses a layout it does not
// know.)
func TestGoZeroLayoutRefusesMetadata(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := provider.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	if _, err := etcd.New(admin, &etcd.Options{Layout: "go-zero"}); err == nil {
		t.Fatal(`New with Layout "go-zero" (not a layout) did not fail`)
	}
	r, err := etcd.New(admin, &etcd.Options{Layout: etcd.LayoutGoZero})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, err = r.Register(ctx, registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9001", Metadata: map[string]string{"zone": "z1"}})
	if !errors.Is(err, registry.ErrInvalidInstance) || errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("Register = %v; want ErrInvalidInstance (and not ErrUnavailable)", err)
	}
	if resp, err := admin.Get(ctx, "user.rpc/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 0 {
		t.Fatalf("%d keys written (%v)", resp.Count, err)
	}
}

// An Update the layout cannot store is refused at once also while the
// registration is being registered again (when Update only stores the value
// for the next attempt): before, it was stored, returned nil, and every
// later attempt failed on it.
func TestGoZeroLayoutRefusesMetadataWhileRegisteringAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := provider.StartEtcd(t)
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	r, err := etcd.New(cli, &etcd.Options{Layout: etcd.LayoutGoZero, TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	in := registry.Instance{Service: "user.rpc", ID: "a", Addr: "127.0.0.1:9001"}
	reg, err := r.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	waitStatus(t, reg, 30*time.Second, "the registration to be retrying", func(st registry.Status) bool { return st.State == registry.Retrying })
	in.Metadata = map[string]string{"zone": "z1"}
	if err := reg.Update(ctx, in); !errors.Is(err, registry.ErrInvalidInstance) {
		t.Fatalf("Update with metadata while retrying = %v; want ErrInvalidInstance", err)
	}
	srv.Start()
	waitStatus(t, reg, 30*time.Second, "the registration to be registered again, with its address only", func(st registry.Status) bool { return st.State == registry.Registered })
}
