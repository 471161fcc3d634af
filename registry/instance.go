package registry

import (
	"fmt"
	"github.com/rollcall-go/rollcall/registry/driver"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Conventional metadata keys. Weight, zone and version are carried in
// Instance.Metadata under these keys so that every backend stores them the same
// way; backends that have native fields for them (Consul's Weights, Nacos'
// weight) map them there as their package documents.
const (
	// MetaWeight is a positive integer load-balancing weight; absent means 1.
	MetaWeight = "weight"
	// MetaZone is the instance's zone or failure domain, e.g. "eu-west-1a".
	MetaZone = "zone"
	// MetaVersion is the version of the software the instance runs.
	MetaVersion = "version"
)

// Limits enforced by Validate.
const (
	MaxServiceLen   = 128
	MaxIDLen        = 128
	MaxMetadataKeys = 64
	MaxMetaKeyLen   = 128
	// MaxMetadataSize bounds the total bytes of metadata keys and values.
	MaxMetadataSize = 16 << 10
	MaxWeight       = 10000
)

// Instance is one endpoint of a service: "user.rpc is served at 10.0.0.7:8080".
// Instances are values; Metadata is copied wherever the package hands an
// instance over, so callers may keep and change what they get.
type Instance struct {
	// Service is the service name, e.g. "user.rpc". It may contain letters,
	// digits and the characters . _ - : (no '/', no spaces, no control
	// characters), at most MaxServiceLen bytes.
	Service string
	// ID tells the instances of one service apart. Empty means Addr.
	// Same characters as Service, at most MaxIDLen bytes.
	ID string
	// Addr is host:port where the instance serves. Host is an IP address or a
	// DNS name; port is 1-65535.
	Addr string
	// Metadata is free-form; see MetaWeight, MetaZone and MetaVersion for the
	// conventional keys.
	Metadata map[string]string
}

// Weight returns the instance's weight from Metadata[MetaWeight], 1 when unset
// or unparsable.
func (in Instance) Weight() int {
	if w, err := strconv.Atoi(in.Metadata[MetaWeight]); err == nil && w > 0 {
		return w
	}
	return 1
}

// Zone returns Metadata[MetaZone].
func (in Instance) Zone() string { return in.Metadata[MetaZone] }

// Version returns Metadata[MetaVersion].
func (in Instance) Version() string { return in.Metadata[MetaVersion] }

// MatchMetadata returns a predicate that keeps the instances whose
// Metadata[key] is one of values ("" matches an instance without key), for
// the filters of package grpcresolver and package selector:
//
//	registry.MatchMetadata(registry.MetaVersion, "v2")
func MatchMetadata(key string, values ...string) func(Instance) bool {
	values = slices.Clone(values)
	return func(in Instance) bool { return slices.Contains(values, in.Metadata[key]) }
}

// Key returns the instance's identity within its service: ID, or Addr when ID
// is empty.
func (in Instance) Key() string {
	if in.ID != "" {
		return in.ID
	}
	return in.Addr
}

// Clone returns a copy of in that shares no map with it.
func (in Instance) Clone() Instance {
	in.Metadata = maps.Clone(in.Metadata)
	return in
}

// Equal reports whether two instances have the same fields and metadata.
func (in Instance) Equal(o Instance) bool {
	return in.Service == o.Service && in.ID == o.ID && in.Addr == o.Addr && maps.Equal(in.Metadata, o.Metadata)
}

// String returns "service/id@addr".
func (in Instance) String() string { return in.Service + "/" + in.Key() + "@" + in.Addr }

// Validate reports whether the instance can be registered. The error wraps
// ErrInvalidInstance and says which field is wrong.
func (in Instance) Validate() error {
	if err := ValidateServiceName(in.Service); err != nil {
		return err
	}
	if in.ID != "" {
		if err := checkName("instance ID", in.ID, MaxIDLen); err != nil {
			return err
		}
	}
	if err := validateAddr(in.Addr); err != nil {
		return err
	}
	if in.ID == "" {
		if err := checkName("instance ID (taken from the address, since none is set)", in.Addr, MaxIDLen); err != nil {
			return err
		}
	}
	return validateMetadata(in.Metadata)
}

// ValidateServiceName reports whether name is a valid service name.
func ValidateServiceName(name string) error {
	return checkName("service name", name, MaxServiceLen)
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidInstance}, args...)...)
}

func checkName(what, s string, max int) error {
	if s == "" {
		return invalid("empty %s", what)
	}
	if len(s) > max {
		return invalid("%s is %d bytes, more than %d", what, len(s), max)
	}
	if s == "." || s == ".." {
		return invalid("%s %q is reserved", what, s)
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case r == '.' || r == '_' || r == '-' || r == ':':
			if i == 0 && r != '_' {
				return invalid("%s %q must start with a letter, digit, '_' or '['", what, s)
			}
		case (r == '[' || r == ']') && what != "service name":
			// An ID may be an IPv6 address with its port: "[2001:db8::1]:8080".
		default:
			if what == "service name" {
				return invalid("%s %q contains %q; allowed are letters, digits and . _ - :", what, s, r)
			}
			return invalid("%s %q contains %q; allowed are letters, digits and . _ - : [ ]", what, s, r)
		}
	}
	return nil
}

func validateAddr(addr string) error {
	if addr == "" {
		return invalid("empty address")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return invalid("address %q is not host:port", addr)
	}
	if host == "" {
		return invalid("address %q has no host", addr)
	}
	ip := net.ParseIP(host)
	if ip == nil && !validDNSName(host) {
		return invalid("address %q: host is neither an IP address nor a DNS name", addr)
	}
	if ip != nil && ip.IsUnspecified() {
		// What net.Listen(":0") reports: no client can dial it.
		return invalid("address %q: %s is the wildcard (listen-on-all) address, which no client can dial; register the host's own IP or name with the listener's port", addr, host)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return invalid("address %q: port must be 1-65535", addr)
	}
	return nil
}

func validDNSName(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

func validateMetadata(md map[string]string) error {
	if len(md) > MaxMetadataKeys {
		return invalid("%d metadata keys, more than %d", len(md), MaxMetadataKeys)
	}
	size := 0
	for k, v := range md {
		if k == "" || len(k) > MaxMetaKeyLen {
			return invalid("metadata key %q must be 1-%d bytes", k, MaxMetaKeyLen)
		}
		if !printable(k) || strings.ContainsAny(k, " =") {
			return invalid("metadata key %q must be printable, without spaces or '='", k)
		}
		if !utf8.ValidString(v) || strings.ContainsFunc(v, unicode.IsControl) {
			return invalid("metadata %q: value has control characters or is not UTF-8", k)
		}
		size += len(k) + len(v)
	}
	if size > MaxMetadataSize {
		return invalid("metadata is %d bytes, more than %d", size, MaxMetadataSize)
	}
	if w, ok := md[MetaWeight]; ok {
		n, err := strconv.Atoi(w)
		if err != nil || n < 1 || n > MaxWeight {
			return invalid("metadata %q=%q: weight must be an integer 1-%d", MetaWeight, w, MaxWeight)
		}
	}
	return nil
}

func printable(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) })
}

// normalize returns a validated copy of in with ID filled in.
func normalize(in Instance) (Instance, error) {
	if err := in.Validate(); err != nil {
		return Instance{}, err
	}
	in = in.Clone()
	in.ID = in.Key()
	return in, nil
}

// normalize is normalize, and then the backend's own check of what it can
// store (driver.InstanceChecker): for an instance about to be registered or
// updated.
func (r *registry) normalize(in Instance) (Instance, error) {
	n, err := normalize(in)
	if err != nil {
		return Instance{}, err
	}
	if c, ok := r.b.(driver.InstanceChecker); ok {
		if err := c.CheckInstance(driver.Instance(n)); err != nil {
			return Instance{}, err
		}
	}
	return n, nil
}
