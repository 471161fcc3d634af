package k8s

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/rollcall-go/rollcall/registry"
)

// Sentinel errors, tested with errors.Is.
var (
	// ErrForbidden is wrapped by every *ForbiddenError.
	ErrForbidden = errors.New("k8s: forbidden by RBAC")
	// ErrLeaseGone means the Lease a registration was bound to was deleted
	// or expired and was garbage-collected (or the API server lost its data).
	ErrLeaseGone = errors.New("k8s: lease gone")
	// ErrSliceGone means a registration's EndpointSlice was deleted or
	// taken over by someone else.
	ErrSliceGone = errors.New("k8s: endpointslice deleted by someone else")
)

// ForbiddenError is returned when the API server refuses a request because
// the client's RBAC permissions lack a verb on a resource. It names both, so
// that the missing rule is obvious; deploy/rbac/ in the source repository
// has Roles that grant what discovery and registration need.
type ForbiddenError struct {
	Verb      string // "list", "watch", "create", ...
	Resource  string // "endpointslices.discovery.k8s.io", "leases.coordination.k8s.io"
	Namespace string
	Err       error // the API server's error
}

func (e *ForbiddenError) Error() string {
	return fmt.Sprintf("k8s: RBAC forbids verb %q on resource %q in namespace %q (grant it with a Role; see deploy/rbac/): %v",
		e.Verb, e.Resource, e.Namespace, e.Err)
}

// Unwrap returns ErrForbidden, registry.ErrPermission and the API server's
// error.
func (e *ForbiddenError) Unwrap() []error {
	return []error{ErrForbidden, registry.ErrPermission, e.Err}
}

const (
	resSlices = "endpointslices.discovery.k8s.io"
	resLeases = "leases.coordination.k8s.io"
)

// unreachable reports whether err means the API server did not answer, or
// answered that it cannot serve (5xx, 429): not an answer about the object.
func unreachable(err error) bool {
	if err == nil {
		return false
	}
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		code := st.Status().Code
		return code >= 500 || code == http.StatusTooManyRequests || code == 0
	}
	return true
}

// wrap turns an error from a call to the API server into the error the
// backend returns: ctx's own error unchanged when ctx is done; a
// *ForbiddenError for RBAC refusals and registry.ErrPermission for refused
// credentials (both are registry.ErrPermission); registry.ErrInvalidInstance for objects
// the API server finds invalid; registry.ErrUnavailable (with the cause) when
// the server did not answer.
func (b *backend) wrap(ctx context.Context, verb, resource string, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
		return ctx.Err()
	}
	switch {
	case apierrors.IsForbidden(err):
		return &ForbiddenError{Verb: verb, Resource: resource, Namespace: b.ns, Err: err}
	case apierrors.IsUnauthorized(err):
		return fmt.Errorf("k8s: %s %s in namespace %q: the API server does not accept the client's credentials (token or certificate): %w: %w",
			verb, resource, b.ns, registry.ErrPermission, err)
	case apierrors.IsInvalid(err):
		return fmt.Errorf("%w: k8s: %s %s: %w", registry.ErrInvalidInstance, verb, resource, err)
	case unreachable(err):
		b.noteDown()
		return fmt.Errorf("k8s: %s %s in namespace %q: %w: %w", verb, resource, b.ns, registry.ErrUnavailable, err)
	}
	return fmt.Errorf("k8s: %s %s in namespace %q: %w", verb, resource, b.ns, err)
}
