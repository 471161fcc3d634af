package consul

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

func testBackend() *backend { return newBackend(&api.Client{}, &Options{}) }

// entryOf is what the health endpoint returns for a registration.
func entryOf(reg *api.AgentServiceRegistration, nodeAddr string) *api.ServiceEntry {
	s := &api.AgentService{ID: reg.ID, Service: reg.Name, Tags: reg.Tags, Meta: reg.Meta, Port: reg.Port, Address: reg.Address}
	s.Weights = api.AgentWeights{Passing: 1, Warning: 1}
	if reg.Weights != nil {
		s.Weights = *reg.Weights
	}
	return &api.ServiceEntry{Node: &api.Node{Node: "n1", Address: nodeAddr}, Service: s}
}

func TestMappingRoundTrips(t *testing.T) {
	b := testBackend()
	for _, in := range []driver.Instance{
		{Service: "user.rpc", ID: "a", Addr: "10.0.0.7:8080", Metadata: map[string]string{
			registry.MetaWeight: "3", registry.MetaZone: "z1", registry.MetaVersion: "v1", "team": "core"}},
		{Service: "user.rpc", ID: "10.0.0.7:8080", Addr: "10.0.0.7:8080"},
		{Service: "a:b", ID: "c:d", Addr: "[::1]:1", Metadata: map[string]string{"k_1-x": strings.Repeat("v", 512)}},
		{Service: "svc", ID: "host-1", Addr: "host.example.com:65535", Metadata: map[string]string{registry.MetaWeight: "10000"}},
	} {
		reg, err := b.registration(in, "rollcall-session~x")
		if err != nil {
			t.Fatalf("registration(%v): %v", in, err)
		}
		if reg.Meta[registry.MetaWeight] != "" {
			t.Errorf("%v: weight in Meta: %v", in, reg.Meta)
		}
		if reg.Check == nil || reg.Check.AliasService != "rollcall-session~x" || reg.Check.Status != api.HealthPassing {
			t.Errorf("%v: check %+v, want a passing alias of the session", in, reg.Check)
		}
		got, ok := b.fromEntry(entryOf(reg, "192.0.2.1"))
		if !ok || got.Service != in.Service || got.ID != in.ID || got.Addr != in.Addr || !maps.Equal(got.Metadata, in.Metadata) {
			t.Errorf("round trip of %v gave %v", in, got)
		}
	}
}

func TestRegistrationMapsWeightZoneVersion(t *testing.T) {
	reg, err := testBackend().registration(driver.Instance{Service: "s", ID: "i", Addr: "127.0.0.1:80", Metadata: map[string]string{
		registry.MetaWeight: "7", registry.MetaZone: "eu-1a", registry.MetaVersion: "v2", "x": "y"}}, "sess")
	if err != nil {
		t.Fatal(err)
	}
	if reg.ID != "s~i" || reg.Name != "s" || reg.Address != "127.0.0.1" || reg.Port != 80 {
		t.Errorf("registration %+v", reg)
	}
	if reg.Weights == nil || reg.Weights.Passing != 7 || reg.Weights.Warning != 1 {
		t.Errorf("Weights = %+v, want passing 7", reg.Weights)
	}
	if want := []string{"version=v2", "zone=eu-1a"}; !slices.Equal(reg.Tags, want) {
		t.Errorf("Tags = %v, want %v", reg.Tags, want)
	}
	if want := map[string]string{"zone": "eu-1a", "version": "v2", "x": "y"}; !maps.Equal(reg.Meta, want) {
		t.Errorf("Meta = %v, want %v", reg.Meta, want)
	}
	if reg.Check.DeregisterCriticalServiceAfter != "1m0s" {
		t.Errorf("DeregisterCriticalServiceAfter = %q, want 1m0s (max(1m, 3*10s))", reg.Check.DeregisterCriticalServiceAfter)
	}
}

func TestRegistrationRejectsMetadataConsulRefuses(t *testing.T) {
	for _, md := range []map[string]string{
		{"a.b": "v"},
		{"a/b": "v"},
		{"consul-x": "v"},
		{strings.Repeat("k", 129): "v"},
		{"k": strings.Repeat("v", 513)},
	} {
		_, err := testBackend().registration(driver.Instance{Service: "s", ID: "i", Addr: "127.0.0.1:80", Metadata: md}, "")
		if !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("metadata %.40v: err = %v, want ErrInvalidInstance", md, err)
		}
	}
}

func TestFromEntryReadsOtherTools(t *testing.T) {
	b := testBackend()
	e := &api.ServiceEntry{
		Node: &api.Node{Address: "10.1.1.1"},
		Service: &api.AgentService{ID: "web-1", Service: "web", Port: 8080,
			Tags:    []string{"version=v7", "zone=ignored", "primary"},
			Meta:    map[string]string{"zone": "z9", "weight": "banana"},
			Weights: api.AgentWeights{Passing: 20000, Warning: 1}},
	}
	got, ok := b.fromEntry(e)
	want := driver.Instance{Service: "web", ID: "web-1", Addr: "10.1.1.1:8080",
		Metadata: map[string]string{"version": "v7", "zone": "z9", "weight": "10000"}}
	if !ok || got.ID != want.ID || got.Addr != want.Addr || !maps.Equal(got.Metadata, want.Metadata) {
		t.Fatalf("fromEntry = %+v, want %+v", got, want)
	}
	// Garbage comes out as it is, for package registry to reject; nothing
	// panics.
	for _, e := range []*api.ServiceEntry{
		nil,
		{},
		{Service: &api.AgentService{ID: "web~", Service: "web"}},
		{Node: nil, Service: &api.AgentService{ID: "x", Service: "web", Port: 1}},
	} {
		in, ok := b.fromEntry(e)
		if ok && in.ID == "" {
			t.Errorf("fromEntry(%+v) = %+v: an empty ID would be taken from the address", e, in)
		}
	}
	if _, ok := b.fromEntry(nil); ok {
		t.Error("fromEntry(nil) ok")
	}
}
