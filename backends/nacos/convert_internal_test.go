package nacos

import (
	"log/slog"
	"maps"
	"reflect"
	"testing"

	"github.com/nacos-group/nacos-sdk-go/v2/model"

	"github.com/rollcall-go/rollcall/registry/driver"
)

func TestConvertDelta(t *testing.T) {
	b := &backend{log: slog.Default()}
	host := func(ip string, port uint64, weight float64, md map[string]string) model.Instance {
		return model.Instance{Ip: ip, Port: port, Weight: weight, Enable: true, Healthy: true, Metadata: md}
	}
	v1 := []model.Instance{
		host("10.0.0.1", 80, 1, map[string]string{MetaID: "a", "zone": "z1"}),
		host("10.0.0.2", 80, 2.4, nil),
		host("10.0.0.3", 80, 1, map[string]string{MetaID: "c"}),
	}
	m1, ev := b.convert("s", v1, nil)
	want1 := map[string]driver.Instance{
		"a":           {Service: "s", ID: "a", Addr: "10.0.0.1:80", Metadata: map[string]string{"zone": "z1"}},
		"10.0.0.2:80": {Service: "s", ID: "10.0.0.2:80", Addr: "10.0.0.2:80", Metadata: map[string]string{"weight": "2"}},
		"c":           {Service: "s", ID: "c", Addr: "10.0.0.3:80"},
	}
	if !maps.EqualFunc(m1, want1, func(a, b driver.Instance) bool { return reflect.DeepEqual(a, b) }) {
		t.Fatalf("convert = %v", m1)
	}
	if len(puts(ev)) != 3 || len(dels(ev)) != 0 {
		t.Fatalf("first delta = %+v", ev)
	}
	v2 := []model.Instance{
		host("10.0.0.1", 80, 1, map[string]string{MetaID: "a", "zone": "z1"}), // same
		host("10.0.0.2", 80, 2.4, nil),                                        // same
		host("10.0.0.3", 81, 1, map[string]string{MetaID: "c"}),               // moved
		host("10.0.0.4", 80, 1, map[string]string{MetaID: "d"}),               // new
	}
	m2, ev := b.convert("s", v2, m1)
	if ids(puts(ev)) != "c,d" || len(dels(ev)) != 0 {
		t.Fatalf("second delta = %+v", ev)
	}
	if !reflect.DeepEqual(ev, diff(m1, m2)) {
		t.Fatalf("delta %+v differs from diff %+v", ev, diff(m1, m2))
	}
	m3, ev := b.convert("s", v2[:1], m2)
	if len(puts(ev)) != 0 || len(dels(ev)) != 3 || !reflect.DeepEqual(ev, diff(m2, m3)) {
		t.Fatalf("third delta = %+v", ev)
	}
	// Metadata that changes under the same ID and address is an upsert.
	_, ev = b.convert("s", []model.Instance{host("10.0.0.1", 80, 1, map[string]string{MetaID: "a", "zone": "z2"})}, m3)
	if ids(puts(ev)) != "a" {
		t.Fatalf("metadata change delta = %+v", ev)
	}
}

func ids(ins []driver.Instance) string {
	s := ""
	for i, in := range ins {
		if i > 0 {
			s += ","
		}
		s += in.ID
	}
	return s
}

func puts(ev driver.Event) []driver.Instance {
	var out []driver.Instance
	for _, c := range ev.Changes {
		if c.Instance != nil {
			out = append(out, *c.Instance)
		}
	}
	return out
}

func dels(ev driver.Event) []string {
	var out []string
	for _, c := range ev.Changes {
		if c.Instance == nil {
			out = append(out, c.ID)
		}
	}
	return out
}
