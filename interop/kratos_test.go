package interop

import (
	"encoding/json"
	"maps"
	"slices"
	"testing"
	"time"

	kratosetcd "github.com/go-kratos/kratos/contrib/registry/etcd/v2"
	kratosregistry "github.com/go-kratos/kratos/v2/registry"

	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// TestKratosRegistryIsFoundByRollcall: what kratos' etcd Registry writes
// (/microservices/NAME/ID holding its ServiceInstance as JSON) is an
// instance to a rollcall registry with layout=kratos: the address is the
// grpc:// endpoint's (the http:// one is not an address for gRPC), the
// metadata kratos' metadata plus its version under registry.MetaVersion.
// kratos-scheme=http picks the other endpoint. Deregister removes it from a
// rollcall Watcher.
func TestKratosRegistryIsFoundByRollcall(t *testing.T) {
	ep := startEtcd(t)
	kr := kratosetcd.New(adminClient(t, ep))
	si := &kratosregistry.ServiceInstance{
		ID: "k1", Name: "helloworld", Version: "v1.2.3",
		Metadata:  map[string]string{"zone": "z1", "weight": "5"},
		Endpoints: []string{"http://127.0.0.1:8000", "grpc://127.0.0.1:9000?isSecure=false"},
	}
	if err := kr.Register(ctxT(t), si); err != nil {
		t.Fatal(err)
	}
	r := open(t, "etcd://"+ep+"/?layout=kratos")
	want := registry.Instance{Service: "helloworld", ID: "k1", Addr: "127.0.0.1:9000",
		Metadata: map[string]string{"zone": "z1", "weight": "5", registry.MetaVersion: "v1.2.3"}}
	if list := lookup(t, r, "helloworld"); len(list) != 1 || !list[0].Equal(want) {
		t.Fatalf("rollcall read %+v; want %+v", list, want)
	}
	rh := open(t, "etcd://"+ep+"/?layout=kratos&kratos-scheme=http")
	if list := lookup(t, rh, "helloworld"); len(list) != 1 || list[0].Addr != "127.0.0.1:8000" {
		t.Fatalf("with kratos-scheme=http rollcall read %+v; want the http endpoint's address", list)
	}
	w, err := r.Watch(ctxT(t), "helloworld")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if u, err := w.Next(ctxT(t)); err != nil || len(u.Instances()) != 1 {
		t.Fatalf("first update %v, %v", u.Instances(), err)
	}
	if err := kr.Deregister(ctxT(t), si); err != nil {
		t.Fatal(err)
	}
	for {
		u, err := w.Next(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Removed) == 1 && u.Removed[0].ID == "k1" && len(u.Instances()) == 0 {
			break
		}
	}
}

// TestRollcallIsFoundByKratosRegistry: a rollcall registration with
// layout=kratos is a ServiceInstance to kratos' GetService and Watch, with
// the grpc:// endpoint, the version in its own field and the rest of the
// metadata; an Update reaches kratos' watcher, a Deregister empties it.
func TestRollcallIsFoundByKratosRegistry(t *testing.T) {
	ep := startEtcd(t)
	r := open(t, "etcd://"+ep+"/?layout=kratos")
	in := registry.Instance{Service: "helloworld", ID: "r1", Addr: "127.0.0.1:9100",
		Metadata: map[string]string{"zone": "z2", registry.MetaVersion: "v2.0.0"}}
	reg, err := r.Register(ctxT(t), in)
	if err != nil {
		t.Fatal(err)
	}
	// The value is kratos' JSON, with its field names.
	raw := keys(t, adminClient(t, ep), "/microservices/helloworld/")["/microservices/helloworld/r1"]
	var fields map[string]any
	if err := json.Unmarshal([]byte(raw), &fields); err != nil || fields["id"] != "r1" || fields["name"] != "helloworld" {
		t.Fatalf("etcd holds %q (%v)", raw, err)
	}
	kr := kratosetcd.New(adminClient(t, ep))
	got, err := kr.GetService(ctxT(t), "helloworld")
	if err != nil {
		t.Fatal(err)
	}
	same := func(si *kratosregistry.ServiceInstance, addr string, md map[string]string, version string) bool {
		return si.ID == "r1" && si.Name == "helloworld" && si.Version == version &&
			slices.Equal(si.Endpoints, []string{"grpc://" + addr}) && maps.Equal(si.Metadata, md)
	}
	if len(got) != 1 || !same(got[0], "127.0.0.1:9100", map[string]string{"zone": "z2"}, "v2.0.0") {
		t.Fatalf("kratos' GetService = %+v", got)
	}
	kw, err := kr.Watch(ctxT(t), "helloworld")
	if err != nil {
		t.Fatal(err)
	}
	next := make(chan []*kratosregistry.ServiceInstance)
	go func() {
		defer close(next)
		for {
			list, err := kw.Next()
			if err != nil {
				return // Stop
			}
			next <- list
		}
	}()
	defer func() {
		kw.Stop()
		for range next {
		}
	}()
	waitList := func(what string, ok func([]*kratosregistry.ServiceInstance) bool) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case list := <-next:
				if ok(list) {
					return
				}
			case <-deadline:
				t.Fatalf("kratos' watcher: no %s within 10s", what)
			}
		}
	}
	waitList("first list", func(l []*kratosregistry.ServiceInstance) bool {
		return len(l) == 1 && same(l[0], "127.0.0.1:9100", map[string]string{"zone": "z2"}, "v2.0.0")
	})
	in.Addr = "127.0.0.1:9101"
	in.Metadata = map[string]string{"zone": "z3", registry.MetaVersion: "v2.0.1"}
	if err := reg.Update(ctxT(t), in); err != nil {
		t.Fatal(err)
	}
	waitList("update", func(l []*kratosregistry.ServiceInstance) bool {
		return len(l) == 1 && same(l[0], "127.0.0.1:9101", map[string]string{"zone": "z3"}, "v2.0.1")
	})
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	waitList("empty list", func(l []*kratosregistry.ServiceInstance) bool { return len(l) == 0 })
	testutil.WaitFor(t, 5*time.Second, "GetService to be empty", func() bool {
		got, err := kr.GetService(ctxT(t), "helloworld")
		return err == nil && len(got) == 0
	})
}
