package etcd

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/rollcall-go/rollcall/registry"
)

// DefaultDialTimeout bounds one connection attempt (TCP, TLS and HTTP/2
// handshakes) and the authentication of a client, when Config.DialTimeout
// is zero.
const DefaultDialTimeout = 3 * time.Second

// Configure sets cfg up the way the etcd:// URL opener does; call it on the
// clientv3.Config of a client you give to New to get the same behaviour:
//
//   - Unary calls fail at once, with the connection's error ("connection
//     refused", a TLS or handshake failure), while no connection to any
//     endpoint can be made, instead of waiting for one until their context
//     ends (clientv3 waits for ready by default). Watches and keepalives
//     still wait for a connection.
//   - One connection attempt may take cfg.DialTimeout (DefaultDialTimeout
//     when zero); attempts are retried with a backoff of 100ms growing to
//     1s, so a client reconnects within about a second of the server coming
//     back (gRPC's own backoff grows to two minutes), and renews its lease
//     before a restarted etcd, which extends every lease by about its TTL,
//     lets it expire.
//   - Keepalive pings every 5s, answered within 3s, notice a dead or frozen
//     connection (unless cfg sets DialKeepAliveTime itself). gRPC raises
//     keepalive times under 10s to 10s, so a connection to a frozen member
//     is closed only about 13s after its last answer: until then the
//     balancer keeps sending calls to it.
//   - Reads, and the backend's own writes, are tried for a short time on
//     one member and then again (on the next member: the balancer goes
//     round the endpoints), with tries that double from 500ms, until the
//     call's context ends: a frozen member of a cluster that has quorum
//     delays a call by a try instead of failing it.
func Configure(cfg *clientv3.Config) {
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.DialKeepAliveTime <= 0 {
		cfg.DialKeepAliveTime, cfg.DialKeepAliveTimeout = 5*time.Second, 3*time.Second
	}
	cfg.DialOptions = append(cfg.DialOptions,
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: cfg.DialTimeout,
		}),
		grpc.WithChainUnaryInterceptor(shortTries, failFast))
}

// firstTry is the time a first try of a read or write may take on one
// member before it is tried again; each try after it may take twice the
// one before, up to maxTry.
const firstTry, maxTry = 500 * time.Millisecond, 8 * time.Second

// retriedKey marks the context of a write that may be tried again: the
// backend's own transactions, which compare the key's revision or lease
// and so cannot apply twice, grants (an extra lease expires unused) and
// revokes.
type retriedKey struct{}

func retried(ctx context.Context) context.Context { return context.WithValue(ctx, retriedKey{}, true) }

// shortTries is a unary client interceptor, between clientv3's retries and
// failFast: a read (Range), or a write marked by retried, is tried with
// its own deadline, firstTry then doubling, while the call's own context
// lasts. A try that ran out of its deadline is made again at once: gRPC's
// round-robin balancer sends it to the next member, so a member that does
// not answer (frozen, partitioned, its connection not yet known dead)
// costs one try, not the whole call. Errors other than a try's deadline
// are returned as they are.
func shortTries(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if method != "/etcdserverpb.KV/Range" && ctx.Value(retriedKey{}) == nil {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	for try := firstTry; ; try = min(2*try, maxTry) {
		tctx, cancel := context.WithTimeout(ctx, try)
		err := invoker(tctx, method, req, reply, cc, opts...)
		cancel()
		if err == nil || ctx.Err() != nil || tctx.Err() == nil || status.Code(err) != codes.DeadlineExceeded {
			return err
		}
	}
}

// failFast is a unary client interceptor. It sits inside clientv3's retry
// interceptor and makes each attempt fail fast (grpc.WaitForReady(false)):
// an attempt made while the connection is in TRANSIENT_FAILURE fails with
// the connection's error instead of waiting. Such a failure is returned as
// a connError, which carries no gRPC status, so that clientv3 does not
// retry it a hundred times 25ms apart (it retries Unavailable) and does not
// replace it by the bare context error when the context ends. Unavailable
// errors the server sent (no leader, leader changed) keep their status and
// are retried by clientv3 as before.
func failFast(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, append(opts, grpc.WaitForReady(false))...)
	if err == nil || status.Code(err) != codes.Unavailable || cc.GetState() != connectivity.TransientFailure {
		return err
	}
	if _, fromServer := rpctypes.Error(err).(rpctypes.EtcdError); fromServer {
		return err
	}
	return &connError{msg: status.Convert(err).Message()}
}

// connError is a call that failed because no connection could be made.
type connError struct{ msg string }

func (e *connError) Error() string { return "no connection: " + e.msg }

// Permission and authentication failures, as clientv3 returns them.
var permissionErrors = []error{
	rpctypes.ErrPermissionDenied, // no role allows the call
	rpctypes.ErrAuthFailed,       // wrong user name or password
	rpctypes.ErrInvalidAuthToken, // token expired and could not be renewed
	rpctypes.ErrUserEmpty,        // auth is enabled and the client gave no credentials
}

func isPermission(err error) bool {
	for _, p := range permissionErrors {
		if errors.Is(err, p) {
			return true
		}
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.PermissionDenied || ee.Code() == codes.Unauthenticated
	}
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated:
		return true
	}
	return false
}

// classify wraps an error of a call to etcd for the shared layer:
// authentication and authorization failures as registry.ErrPermission,
// context errors unchanged, errors already classified (and instances the
// layout cannot store, registry.ErrInvalidInstance) as they are, and
// everything else as registry.ErrUnavailable.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, registry.ErrUnavailable), errors.Is(err, registry.ErrPermission), errors.Is(err, registry.ErrConflict),
		errors.Is(err, registry.ErrInvalidInstance): // an instance the layout cannot store
		return err
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case isPermission(err):
		return fmt.Errorf("%w: etcd: %w", registry.ErrPermission, err)
	}
	return fmt.Errorf("%w: etcd: %w", registry.ErrUnavailable, err)
}
