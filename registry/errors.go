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
	// ErrUnavailable wraps failures to reach the registry server.
	ErrUnavailable = errors.New("registry: unavailable")
)

// Error records a failed operation on one service.
type Error struct {
	Op      string // "register", "lookup", "watch", "deregister", "update", "ping"
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
