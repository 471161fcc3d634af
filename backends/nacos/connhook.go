package nacos

import (
	"os"
	"reflect"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"google.golang.org/grpc"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client/naming_cache"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client/naming_grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/common/constant"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc"
)

// The SDK does not expose its connection state: the gRPC client that knows
// it sits in unexported fields (NamingClient.serviceProxy ->
// NamingProxyDelegate.grpcClientProxy -> NamingGrpcProxy.rpcClient). Its
// RpcClient has an exported RegisterConnectionListener, which the SDK uses
// itself for its redo. hookConnection reaches it by reflection, checking every
// step, and registers l after the SDK's own listener, so that l runs after the
// SDK's redo on each connection (listeners run in order, on one goroutine).
// With another client type, or another SDK layout, it returns false and the
// backend does without connection events.

// rpcClient returns the SDK's gRPC client under cli.
func rpcClient(cli naming_client.INamingClient) (*rpc.RpcClient, bool) {
	nc, ok := sdkClient(cli).(*naming_client.NamingClient)
	if !ok || nc == nil {
		return nil, false
	}
	sp, ok := unexported(reflect.ValueOf(nc).Elem(), "serviceProxy")
	if !ok {
		return nil, false
	}
	delegate, ok := sp.Interface().(*naming_client.NamingProxyDelegate)
	if !ok || delegate == nil {
		return nil, false
	}
	gp, ok := unexported(reflect.ValueOf(delegate).Elem(), "grpcClientProxy")
	if !ok {
		return nil, false
	}
	grpcProxy, ok := gp.Interface().(*naming_grpc.NamingGrpcProxy)
	if !ok || grpcProxy == nil {
		return nil, false
	}
	rc, ok := unexported(reflect.ValueOf(grpcProxy).Elem(), "rpcClient")
	if !ok {
		return nil, false
	}
	client, ok := rc.Interface().(rpc.IRpcClient)
	if !ok || client == nil || client.GetRpcClient() == nil {
		return nil, false
	}
	return client.GetRpcClient(), true
}

// serviceCache returns the SDK's cache of subscribed services under cli
// (NamingClient.serviceInfoHolder), whose entries carry the lastRefTime that
// the SDK itself orders news by.
func serviceCache(cli naming_client.INamingClient) (*naming_cache.ServiceInfoHolder, bool) {
	nc, ok := sdkClient(cli).(*naming_client.NamingClient)
	if !ok || nc == nil {
		return nil, false
	}
	f, ok := unexported(reflect.ValueOf(nc).Elem(), "serviceInfoHolder")
	if !ok {
		return nil, false
	}
	h, ok := f.Interface().(*naming_cache.ServiceInfoHolder)
	return h, ok && h != nil
}

// hookConnection registers l with the gRPC client under cli.
func hookConnection(cli naming_client.INamingClient, l rpc.IConnectionEventListener) bool {
	rc, ok := rpcClient(cli)
	if ok {
		rc.RegisterConnectionListener(l)
	}
	return ok
}

// eventPending reports whether the SDK's connection-event queue holds an
// event its goroutine has not taken yet.
func eventPending(rc *rpc.RpcClient) bool {
	ch, ok := unexported(reflect.ValueOf(rc).Elem(), "eventChan")
	return ok && ch.Kind() == reflect.Chan && ch.Len() > 0
}

// awaitInitialEvent waits (up to max) until the SDK has handled the
// CONNECTED event that NewNamingClient queues as it returns: handling it runs
// the SDK's redo, which, if it ran after the first registrations, could send
// again a registration withdrawn in between.
func awaitInitialEvent(cli naming_client.INamingClient, max time.Duration) {
	rc, ok := rpcClient(cli)
	if !ok {
		return
	}
	seen := make(chan struct{})
	var once sync.Once
	rc.RegisterConnectionListener(funcListener(func() { once.Do(func() { close(seen) }) }))
	if !eventPending(rc) {
		return // taken already: the redo found nothing registered
	}
	t := time.NewTimer(max)
	defer t.Stop()
	select {
	case <-seen:
	case <-t.C:
	}
}

// funcListener calls itself on every connection.
type funcListener func()

func (f funcListener) OnConnected()  { f() }
func (f funcListener) OnDisConnect() {}

// unexported returns the named field of the struct v, readable.
func unexported(v reflect.Value, name string) (reflect.Value, bool) {
	if v.Kind() != reflect.Struct {
		return reflect.Value{}, false
	}
	f := v.FieldByName(name)
	if !f.IsValid() || !f.CanAddr() {
		return reflect.Value{}, false
	}
	return reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem(), true
}

// connListener forwards the SDK's connection events to a backend. It must
// not block: it runs on the SDK's event goroutine.
type connListener struct{ b *backend }

func (l connListener) OnConnected()  { l.b.onConnected() }
func (l connListener) OnDisConnect() { l.b.onDisconnected() }

// The SDK's reconnect loop (RpcClient.reconnect, on a goroutine of its own)
// does not look at the client's shutdown once a connection attempt is under
// way: an attempt that succeeds after Shutdown installs its new connection
// (a grpc.ClientConn with a bidirectional stream) as the current one, sets
// the status back to RUNNING, and nothing ever closes it. A client closed
// while reconnecting (the server stopped, paused, or just back) would keep a
// live connection, and its grpc goroutines, for the life of the process.
//
// reapLateConnection, called after the SDK's CloseClient of a client that
// was not RUNNING (so an attempt may be under way), waits for that attempt
// to end, up to the longest an attempt takes (its server check's timeout and
// the setup's pause, plus a margin): if the status turns RUNNING again, the
// attempt succeeded and its connection, read after that atomic store (which
// the SDK makes after installing it), is closed and the status put back to
// SHUTDOWN, so that the connection's stream goroutine ends without asking
// for another reconnect. The SDK's queued connection events are drained
// meanwhile, so that the attempt's CONNECTED event never blocks it.
func reapLateConnection(rc *rpc.RpcClient) {
	deadline := time.Now().Add(attemptBound())
	status, ok := unexported(reflect.ValueOf(rc).Elem(), "rpcClientStatus")
	if !ok || status.Kind() != reflect.Int32 {
		return
	}
	ptr := (*int32)(unsafe.Pointer(status.UnsafeAddr()))
	events, _ := unexported(reflect.ValueOf(rc).Elem(), "eventChan")
	for {
		if events.IsValid() && events.Kind() == reflect.Chan {
			for {
				if _, ok := events.TryRecv(); !ok {
					break
				}
			}
		}
		if atomic.LoadInt32(ptr) == int32(rpc.RUNNING) {
			closeCurrentConnection(rc)
			atomic.StoreInt32(ptr, int32(rpc.SHUTDOWN))
			return
		}
		if time.Now().After(deadline) {
			return
		}
		time.Sleep(reapPoll) // polling the SDK's status, which has no event for this
	}
}

// reapPoll is how often reapLateConnection looks at the SDK's status.
const reapPoll = 20 * time.Millisecond

// attemptBound is the longest one SDK connection attempt takes: its server
// check waits up to the SDK's initial gRPC timeout (the
// nacos.remote.client.grpc.timeout environment variable, 3 s by default),
// then the connection setup pauses 100 ms; the margin covers the dial.
func attemptBound() time.Duration {
	ms := int64(constant.DEFAULT_TIMEOUT_MILLS)
	if v, err := strconv.ParseInt(os.Getenv("nacos.remote.client.grpc.timeout"), 10, 64); err == nil && v > 0 {
		ms = v
	}
	return time.Duration(ms)*time.Millisecond + time.Second
}

// closeCurrentConnection closes the grpc.ClientConn of rc's current
// connection (rpc.Connection.conn).
func closeCurrentConnection(rc *rpc.RpcClient) {
	cur, ok := unexported(reflect.ValueOf(rc).Elem(), "currentConnection")
	if !ok || cur.IsNil() {
		return
	}
	v := cur.Elem() // the dynamic value: *rpc.GrpcConnection
	for v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return
		}
		v = v.Elem()
	}
	conn, ok := unexported(v, "conn") // promoted from the embedded *rpc.Connection
	if !ok {
		return
	}
	if cc, ok := conn.Interface().(*grpc.ClientConn); ok && cc != nil {
		_ = cc.Close()
	}
}
