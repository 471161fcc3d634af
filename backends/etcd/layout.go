package etcd

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Layout is how instances are stored in etcd: where a service's keys live
// and what their values hold. Every layout uses the same machinery
// (leases, ownership, guards, watches); a layout is only the codec between
// a key-value and an Instance. See the package doc for each layout's keys
// and values.
type Layout string

// The layouts.
const (
	// LayoutRollcall is rollcall's own: ROOT SERVICE/ID holding
	// {"Addr":"host:port","Metadata":{...}}. ROOT is /rollcall/ followed by
	// the URL path.
	LayoutRollcall Layout = "rollcall"
	// LayoutGoZero is go-zero's (core/discov): KEY/ID holding the plain
	// address host:port, as discov.Publisher writes it. No metadata.
	LayoutGoZero Layout = "gozero"
	// LayoutKratos is kratos' (contrib/registry/etcd):
	// NAMESPACE/SERVICE/ID holding the JSON of its registry.ServiceInstance.
	LayoutKratos Layout = "kratos"
)

// Default roots of the layouts, used when Options.Prefix is empty and the
// URL has no path.
const (
	// DefaultGoZeroPrefix is empty: go-zero keys are the service key itself
	// ("user.rpc/7587..."), at the root of the key space.
	DefaultGoZeroPrefix = ""
	// DefaultKratosPrefix is kratos' default namespace, "/microservices",
	// with its separator.
	DefaultKratosPrefix = "/microservices/"
	// DefaultKratosScheme is the kratos endpoint scheme read and written
	// when Options.KratosScheme is empty.
	DefaultKratosScheme = "grpc"
)

// codec turns an instance into the value stored at its key and back.
type codec interface {
	// encode returns the value of inst; an instance the layout cannot
	// express is an error wrapping registry.ErrInvalidInstance.
	encode(inst driver.Instance) (string, error)
	// decode returns the instance stored as v at the key of service and id.
	decode(service, id string, v []byte) (driver.Instance, error)
	// addr returns the address in v, "" if there is none.
	addr(v []byte) string
}

func (l Layout) valid() bool {
	switch l {
	case LayoutRollcall, LayoutGoZero, LayoutKratos:
		return true
	}
	return false
}

// defaultPrefix is the root of l's service directories when none is given.
func (l Layout) defaultPrefix() string {
	switch l {
	case LayoutGoZero:
		return DefaultGoZeroPrefix
	case LayoutKratos:
		return DefaultKratosPrefix
	}
	return DefaultPrefix
}

// urlPrefix is the root a URL path (without its slashes, not empty) gives
// in layout l: under /rollcall/ for rollcall's layout; for go-zero the
// path is the part of go-zero's key before the service (team-a/ for keys
// team-a/user.rpc/ID); for kratos it is the namespace (/team-a/).
func (l Layout) urlPrefix(path string) string {
	switch l {
	case LayoutGoZero:
		return path + "/"
	case LayoutKratos:
		return "/" + path + "/"
	}
	return DefaultPrefix + path + "/"
}

func newCodec(o *Options) codec {
	switch o.Layout {
	case LayoutGoZero:
		return goZeroCodec{}
	case LayoutKratos:
		return kratosCodec{scheme: o.KratosScheme}
	}
	return rollcallCodec{}
}

// rollcallCodec: {"Addr":..., "Metadata":...}, etcd naming/endpoints.Endpoint's shape.
type rollcallCodec struct{}

// value is the stored JSON, etcd naming/endpoints.Endpoint's shape.
type value struct {
	Addr     string            `json:"Addr"`
	Metadata map[string]string `json:"Metadata,omitempty"`
}

func (rollcallCodec) encode(inst driver.Instance) (string, error) {
	v, err := json.Marshal(value{Addr: inst.Addr, Metadata: inst.Metadata})
	return string(v), err
}

func (c rollcallCodec) addr(v []byte) string {
	var val value
	_ = json.Unmarshal(v, &val)
	return val.Addr
}

func (rollcallCodec) decode(service, id string, v []byte) (driver.Instance, error) {
	var val value
	if err := json.Unmarshal(v, &val); err != nil {
		return driver.Instance{}, err
	}
	return driver.Instance{Service: service, ID: id, Addr: val.Addr, Metadata: val.Metadata}, nil
}

// goZeroCodec: the value is the address, nothing else (go-zero's
// Subscriber hands values to its resolver as addresses).
type goZeroCodec struct{}

func (goZeroCodec) encode(inst driver.Instance) (string, error) {
	if len(inst.Metadata) > 0 {
		return "", fmt.Errorf("%w: etcd: layout %s stores only the address (go-zero's values are plain host:port), so %s cannot keep its metadata %v; register it without metadata, or use the rollcall or kratos layout",
			registry.ErrInvalidInstance, LayoutGoZero, inst.Service+"/"+inst.ID, slices.Sorted(maps.Keys(inst.Metadata)))
	}
	return inst.Addr, nil
}

func (goZeroCodec) addr(v []byte) string { return string(v) }

func (goZeroCodec) decode(service, id string, v []byte) (driver.Instance, error) {
	return driver.Instance{Service: service, ID: id, Addr: string(v)}, nil
}

// kratosCodec: kratos' registry.ServiceInstance as JSON. Addr is the host
// of the first endpoint of the scheme (grpc://host:port); metadata is
// kratos' metadata plus registry.MetaVersion from its version field.
type kratosCodec struct{ scheme string }

// kratosInstance is kratos' registry.ServiceInstance (same JSON names).
type kratosInstance struct {
	ID        string            `json:"id"`
	Name      string            `json:"name"`
	Version   string            `json:"version"`
	Metadata  map[string]string `json:"metadata"`
	Endpoints []string          `json:"endpoints"`
}

func (c kratosCodec) encode(inst driver.Instance) (string, error) {
	md := maps.Clone(inst.Metadata)
	version := md[registry.MetaVersion]
	delete(md, registry.MetaVersion)
	v, err := json.Marshal(kratosInstance{
		ID: inst.ID, Name: inst.Service, Version: version, Metadata: md,
		Endpoints: []string{c.scheme + "://" + inst.Addr},
	})
	return string(v), err
}

func (c kratosCodec) decode(service, id string, v []byte) (driver.Instance, error) {
	var ki kratosInstance
	if err := json.Unmarshal(v, &ki); err != nil {
		return driver.Instance{}, err
	}
	if ki.Name != service {
		// kratos' own readers skip these too.
		return driver.Instance{}, fmt.Errorf("kratos instance of service %q under the directory of %q", ki.Name, service)
	}
	addr := c.endpoint(ki.Endpoints)
	if addr == "" {
		return driver.Instance{}, fmt.Errorf("kratos instance has no %s:// endpoint (endpoints %q)", c.scheme, ki.Endpoints)
	}
	md := maps.Clone(ki.Metadata)
	if ki.Version != "" {
		if md == nil {
			md = map[string]string{}
		}
		md[registry.MetaVersion] = ki.Version
	}
	return driver.Instance{Service: service, ID: id, Addr: addr, Metadata: md}, nil
}

func (c kratosCodec) addr(v []byte) string {
	var ki kratosInstance
	_ = json.Unmarshal(v, &ki)
	return c.endpoint(ki.Endpoints)
}

// endpoint returns host:port of the first endpoint of c's scheme.
func (c kratosCodec) endpoint(eps []string) string {
	for _, ep := range eps {
		if u, err := url.Parse(ep); err == nil && u.Scheme == c.scheme && u.Host != "" {
			return u.Host
		}
	}
	return ""
}

// layoutOf parses the layout URL parameter.
func layoutOf(name string) (Layout, error) {
	l := Layout(strings.ToLower(name))
	if !l.valid() {
		return "", fmt.Errorf("layout %q is not one of rollcall, gozero, kratos", name)
	}
	return l, nil
}

// validScheme reports whether s is a lower-case URL scheme.
func validScheme(s string) bool {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}
