package registry

import "errors"

// Sentinel errors, tested with errors.Is.
var (
	// ErrClosed is returned by every method of a closed Registry, Watcher or
	// Registration.
	ErrClosed = errors.New("registry: closed")
	// ErrInvalidInstance wraps every validation failure of an instance or a
	// service name.
	ErrInvalidInstance = errors.New("registry: invalid instance")
	// ErrInvalidURL wraps every failure to parse a registry URL.
	ErrInvalidURL = errors.New("registry: invalid URL")
	// ErrUnknownScheme is returned by Open for a scheme no backend registered.
	ErrUnknownScheme = errors.New("registry: unknown scheme")
	// ErrUnavailable wraps failures to reach the registry server, and calls
	// the server did not answer within their bound.
	ErrUnavailable = errors.New("registry: unavailable")
	// ErrPermission wraps authentication and authorization failures (bad
	// credentials, a missing etcd role, an ACL token or RBAC rule that does
	// not allow the call). They are not outages: they are reported as they
	// are and retried only at the slowest backoff.
	ErrPermission = errors.New("registry: permission denied")
	// ErrConflict wraps a registration of a (service, ID) that is already
	// registered: by this Registry (a second Register of a live
	// registration), or by another live registrar in the registry server.
	ErrConflict = errors.New("registry: instance ID already registered")
)

// Error records a failed operation on one service.
type Error struct {
	Op      string // "register", "lookup", "watch", "deregister", "update", "ping", "services"
	Service string
	Err     error
}

func (e *Error) Error() string {
	if e.Service == "" {
		return "registry: " + e.Op + ": " + e.Err.Error()
	}
	return "registry: " + e.Op + " " + e.Service + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

func opErr(op, service string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Service: service, Err: err}
}
