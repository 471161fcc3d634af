package consul

import (
	"fmt"
	"maps"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// idSep joins the service name and the instance ID into the Consul service
// ID. Service IDs must be unique per agent while instance IDs are unique only
// within a service; '~' cannot occur in either name, so the join is
// unambiguous, and it needs no escaping in a URL path.
const idSep = "~"

// serviceID returns the Consul service ID of an instance of the Consul
// service name.
func serviceID(name, id string) string { return name + idSep + id }

// checkID returns the ID of the check of a Consul service ID; it is the ID
// Consul itself gives the single check of a service registration. The
// session's TTL check has it.
func checkID(sid string) string { return "service:" + sid }

// aliasCheckID returns the ID of the alias check of an instance's Consul
// service ID sid that follows the session whose service ID is sessionSID.
// It names the session, so that a registrar tells its own registration of an
// instance from another registrar's ('@' is in no service ID).
func aliasCheckID(sid, sessionSID string) string { return "rollcall:" + sid + "@" + sessionSID }

// Consul's limits on service metadata (agent/structs: validateMetaPair).
const (
	metaMaxValueLen = 512
	metaMaxKeyLen   = 128
	metaReserved    = "consul-"
)

var metaKeyFormat = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`).MatchString

// registration builds the agent service registration of inst, with its
// alias check of the session's heartbeat (sessionSID; empty for validation
// only). Its Name carries the backend's prefix. Metadata that Consul would refuse is an ErrInvalidInstance here,
// before any request.
func (b *backend) registration(inst driver.Instance, sessionSID string) (*api.AgentServiceRegistration, error) {
	host, portStr, err := net.SplitHostPort(inst.Addr)
	if err != nil {
		return nil, fmt.Errorf("%w: consul: address %q is not host:port", registry.ErrInvalidInstance, inst.Addr)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("%w: consul: address %q has no numeric port", registry.ErrInvalidInstance, inst.Addr)
	}
	weight := 1
	var meta map[string]string
	var tags []string
	for k, v := range inst.Metadata {
		if k == registry.MetaWeight {
			w, err := strconv.Atoi(v)
			if err != nil || w < 1 || w > 65535 {
				return nil, fmt.Errorf("%w: consul: weight %q is not an integer 1-65535", registry.ErrInvalidInstance, v)
			}
			weight = w
			continue
		}
		if err := checkMeta(k, v); err != nil {
			return nil, err
		}
		if meta == nil {
			meta = make(map[string]string, len(inst.Metadata))
		}
		meta[k] = v
		if k == registry.MetaZone || k == registry.MetaVersion {
			tags = append(tags, k+"="+v)
		}
	}
	slices.Sort(tags)
	name := b.name(inst.Service)
	sid := serviceID(name, inst.ID)
	return &api.AgentServiceRegistration{
		ID:      sid,
		Name:    name,
		Address: host,
		Port:    port,
		Tags:    tags,
		Meta:    meta,
		Weights: &api.AgentWeights{Passing: weight, Warning: 1},
		Check: &api.AgentServiceCheck{
			CheckID:      aliasCheckID(sid, sessionSID),
			Name:         "rollcall session",
			Notes:        "passing while the registrar's session " + sessionSID + " is renewed",
			AliasService: sessionSID,
			// Passing from the start, so that the instance is visible once
			// the registration returns; the alias takes the session's
			// status at once.
			Status:                         api.HealthPassing,
			DeregisterCriticalServiceAfter: consulDuration(b.reap),
		},
	}, nil
}

// sessionRegistration builds the registration of a session's heartbeat
// service, whose TTL check the renewal loop renews.
func (b *backend) sessionRegistration(id string) *api.AgentServiceRegistration {
	name := b.name(SessionService)
	sid := serviceID(name, id)
	host, _ := os.Hostname()
	return &api.AgentServiceRegistration{
		ID:   sid,
		Name: name,
		Meta: map[string]string{"pid": strconv.Itoa(os.Getpid()), "host": host},
		Check: &api.AgentServiceCheck{
			CheckID:                        checkID(sid),
			Name:                           "rollcall session TTL",
			Notes:                          "renewed by the rollcall registrar every TTL/3",
			TTL:                            consulDuration(b.ttl),
			Status:                         api.HealthPassing,
			DeregisterCriticalServiceAfter: consulDuration(b.reap),
		},
	}
}

// consulDuration formats d for Consul, which parses it with
// time.ParseDuration; whole milliseconds keep it short.
func consulDuration(d time.Duration) string {
	return max(d.Round(time.Millisecond), time.Millisecond).String()
}

func checkMeta(k, v string) error {
	switch {
	case !metaKeyFormat(k) || len(k) > metaMaxKeyLen:
		return fmt.Errorf("%w: consul: metadata key %q: Consul accepts only letters, digits, '_' and '-', at most %d bytes",
			registry.ErrInvalidInstance, k, metaMaxKeyLen)
	case strings.HasPrefix(k, metaReserved):
		return fmt.Errorf("%w: consul: metadata key %q: the prefix %q is reserved by Consul", registry.ErrInvalidInstance, k, metaReserved)
	case len(v) > metaMaxValueLen:
		return fmt.Errorf("%w: consul: metadata %q: value is %d bytes; Consul accepts at most %d",
			registry.ErrInvalidInstance, k, len(v), metaMaxValueLen)
	}
	return nil
}

// fromEntry converts a health entry read from Consul, removing the
// backend's prefix from the service name. It never fails: entries that are
// not valid instances come out as whatever they hold, and package registry
// validates them and skips the bad ones with a log line. ok is false only
// for entries with no service at all.
func (b *backend) fromEntry(e *api.ServiceEntry) (driver.Instance, bool) {
	if e == nil || e.Service == nil {
		return driver.Instance{}, false
	}
	s := e.Service
	host := s.Address
	if host == "" && e.Node != nil {
		host = e.Node.Address
	}
	id := s.ID
	if rest, ok := strings.CutPrefix(id, s.Service+idSep); ok && rest != "" {
		id = rest
	}
	service := s.Service
	if b.prefix != "" && len(service) > len(b.prefix) && strings.EqualFold(service[:len(b.prefix)], b.prefix) {
		service = service[len(b.prefix):]
	}
	in := driver.Instance{Service: service, ID: id, Addr: net.JoinHostPort(host, strconv.Itoa(s.Port))}
	md := maps.Clone(s.Meta)
	// The weight is Weights.Passing, never a Meta key: weight 1 (Consul's
	// default) is reported as no key, and weights above rollcall's maximum
	// are capped rather than making the instance invalid.
	delete(md, registry.MetaWeight)
	if w := s.Weights.Passing; w > 1 {
		if md == nil {
			md = map[string]string{}
		}
		md[registry.MetaWeight] = strconv.Itoa(min(w, registry.MaxWeight))
	}
	// Registrations by other tools that carry zone or version only as
	// "zone=..." / "version=..." tags.
	for _, t := range s.Tags {
		for _, k := range []string{registry.MetaZone, registry.MetaVersion} {
			if v, ok := strings.CutPrefix(t, k+"="); ok {
				if _, has := md[k]; !has {
					if md == nil {
						md = map[string]string{}
					}
					md[k] = v
				}
			}
		}
	}
	if len(md) > 0 {
		in.Metadata = md
	}
	return in, true
}

// sameInstances reports whether two lists converted from Consul hold the
// same instances in the same order.
func sameInstances(a, b []driver.Instance) bool {
	return slices.EqualFunc(a, b, func(x, y driver.Instance) bool {
		return x.Service == y.Service && x.ID == y.ID && x.Addr == y.Addr && maps.Equal(x.Metadata, y.Metadata)
	})
}
