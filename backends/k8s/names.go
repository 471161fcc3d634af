package k8s

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/rollcall-go/rollcall/registry"
)

// Labels and annotations this package reads and writes.
const (
	// LabelServiceName is the label that ties an EndpointSlice to its
	// Service (discovery.k8s.io/v1 LabelServiceName).
	LabelServiceName = "kubernetes.io/service-name"
	// LabelManagedBy is the EndpointSlice label naming the controller that
	// manages it; the EndpointSlice controller leaves slices whose value is
	// not its own alone.
	LabelManagedBy = "endpointslice.kubernetes.io/managed-by"
	// ManagedBy is the value of LabelManagedBy on the slices this package
	// writes, and of LabelAppManagedBy on its Leases.
	ManagedBy = "rollcall.dev"
	// LabelAppManagedBy marks the Leases this package writes.
	LabelAppManagedBy = "app.kubernetes.io/managed-by"
	// LabelLease names, on a slice written by this package, the Lease that
	// keeps it alive (the slice is also owned by that Lease).
	LabelLease = "rollcall.dev/lease"
	// AnnotationService, AnnotationID and AnnotationMetadata carry, on a
	// slice written by this package, the registered instance's service name
	// (as given to Register, port part included), its ID, and its metadata
	// as a JSON object of strings.
	// LabelInstance is, on a slice written by this package, a hash of the
	// registered instance's service name and ID (instanceLabel), so that
	// the slices of one (service, ID), whoever wrote them, are found with a
	// label selector.
	LabelInstance      = "rollcall.dev/instance"
	AnnotationService  = "rollcall.dev/service"
	AnnotationID       = "rollcall.dev/id"
	AnnotationMetadata = "rollcall.dev/metadata"
)

// Metadata keys set on instances read from EndpointSlices not written by
// this package (the zone goes under registry.MetaZone).
const (
	MetaNode        = "k8s.node"        // Endpoint.nodeName
	MetaPod         = "k8s.pod"         // Endpoint.targetRef.name when targetRef.kind is Pod
	MetaHostname    = "k8s.hostname"    // Endpoint.hostname
	MetaPortName    = "k8s.port"        // the slice's port name, when it has one
	MetaHintZones   = "k8s.hints.zones" // Endpoint.hints.forZones, comma separated
	MetaHintNodes   = "k8s.hints.nodes" // Endpoint.hints.forNodes, comma separated
	MetaTerminating = "k8s.terminating" // "true" on serving, terminating endpoints (see package doc)
)

// target is a parsed service name as given to Lookup, Watch and Register:
// "service" or "service:port", port by number or by name.
type target struct {
	name     string // as given
	service  string // value of the kubernetes.io/service-name label
	portName string // port selected by name, or ""
	portNum  int32  // port selected by number, or 0
}

func (t target) allPorts() bool { return t.portName == "" && t.portNum == 0 }

func (t target) selector() string { return LabelServiceName + "=" + t.service }

func badName(format string, args ...any) error {
	return fmt.Errorf("%w: k8s: "+format, append([]any{registry.ErrInvalidInstance}, args...)...)
}

// parseTarget splits a rollcall service name into the Kubernetes Service
// and the port selector.
func parseTarget(name string) (target, error) {
	t := target{name: name, service: name}
	if i := strings.IndexByte(name, ':'); i >= 0 {
		t.service = name[:i]
		port := name[i+1:]
		if port == "" || strings.IndexByte(port, ':') >= 0 {
			return t, badName("service name %q: want \"service\" or \"service:port\"", name)
		}
		if n, err := strconv.Atoi(port); err == nil {
			if n < 1 || n > 65535 {
				return t, badName("service name %q: port %d is not 1-65535", name, n)
			}
			t.portNum = int32(n)
		} else {
			if errs := validation.IsDNS1123Label(port); len(errs) > 0 {
				return t, badName("service name %q: %q is neither a port number nor a port name: %s", name, port, errs[0])
			}
			t.portName = port
		}
	}
	if t.service == "" {
		return t, badName("service name %q: empty Kubernetes service name", name)
	}
	if errs := validation.IsValidLabelValue(t.service); len(errs) > 0 {
		return t, badName("service name %q: %q cannot be the value of the %s label: %s", name, t.service, LabelServiceName, errs[0])
	}
	return t, nil
}

// dnsLabelish maps s to lower-case letters, digits and '-', without a
// leading or trailing '-', at most max bytes; "x" if nothing is left.
func dnsLabelish(s string, max int) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c >= 'A' && c <= 'Z':
			c += 'a' - 'A'
		default:
			c = '-'
		}
		b = append(b, c)
	}
	out := strings.Trim(string(b), "-")
	if len(out) > max {
		out = strings.TrimRight(out[:max], "-")
	}
	if out == "" {
		out = "x"
	}
	return out
}

// sliceName is the name of the EndpointSlice holding one registered
// instance: stable for a given Lease, service name and ID, so that
// publishing the same instance again overwrites it, and distinct between
// Leases, so that two processes never write the same object.
func sliceName(lease, service, id string) string {
	h := sha256.Sum256([]byte(lease + "\x00" + service + "\x00" + id))
	return "rollcall-" + dnsLabelish(service, 40) + "-" + hex.EncodeToString(h[:8])
}

// instanceLabel is the value of LabelInstance for a service name and ID.
func instanceLabel(service, id string) string {
	h := sha256.Sum256([]byte(service + "\x00" + id))
	return hex.EncodeToString(h[:16])
}
