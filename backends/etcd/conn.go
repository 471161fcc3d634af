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
//     connection (unless cfg sets DialKeepAliveTime itself).
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
		grpc.WithChainUnaryInterceptor(failFast))
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
// context errors unchanged, errors already classified as they are, and
// everything else as registry.ErrUnavailable.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, registry.ErrUnavailable), errors.Is(err, registry.ErrPermission), errors.Is(err, registry.ErrConflict):
		return err
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case isPermission(err):
		return fmt.Errorf("%w: etcd: %w", registry.ErrPermission, err)
	}
	return fmt.Errorf("%w: etcd: %w", registry.ErrUnavailable, err)
}
