package nacosserver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	pb "github.com/nacos-group/nacos-sdk-go/v2/api/grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

const (
	// DefaultPushDelay is Nacos' nacos.naming.push.pushTaskDelay default
	// (PushConstants.DEFAULT_PUSH_TASK_DELAY = 500 ms).
	DefaultPushDelay = 500 * time.Millisecond
	// pushTimeout and pushRetryDelay are PushConstants.DEFAULT_PUSH_TASK_TIMEOUT
	// and DEFAULT_PUSH_TASK_RETRY_DELAY: an unacknowledged push is retried to
	// that client alone (PushExecuteTask.ServicePushCallback#onFail).
	pushTimeout    = 5 * time.Second
	pushRetryDelay = time.Second
	// serverRequestTimeout is what ConnectionManager#loadSingle waits for the
	// ConnectResetRequest answer.
	serverRequestTimeout = 3 * time.Second
	// restartDeadline bounds how long Start retries a port that is briefly
	// unavailable.
	restartDeadline = 10 * time.Second
	// maxInbound is Nacos' default nacos.remote.server.grpc.sdk.max-inbound-message-size
	// and the SDK's own default receive limit (10 MiB).
	maxInbound = 10 << 20
)

// Server is an in-process Nacos 2.x naming server. See the package
// documentation for what it implements. All methods are safe for concurrent
// use; Start, Stop and Restart report failures through the testing.TB given to
// the package-level Start and must therefore be called from the test's
// goroutine.
type Server struct {
	tb       testing.TB
	host     string
	httpPort int
	grpcPort int
	verbose  bool

	lifeMu sync.Mutex // serialises Start, Stop and Restart
	closed bool       // guarded by lifeMu: the test is over

	mu        sync.Mutex
	run       *runState // nil while stopped
	paused    bool
	resumeCh  chan struct{} // closed by Resume
	pushDelay time.Duration
	addedMeta map[string]string // added to every registered instance (SetAddedMetadata)
	writes    map[svcKey]Writes // register and batch-register requests handled, by service
	ackWait   time.Duration     // how long a push waits for its ack (pushTimeout)
	reqSeq    uint64

	// Naming data. services holds what survives Stop (the services that exist
	// and their injected instances); the rest lives as long as connections.
	services    map[svcKey]*service
	publishers  map[svcKey]map[string]struct{} // service -> connection ids
	subscribers map[svcKey]map[string]struct{} // service -> connection ids
	snapshots   map[svcKey]model.Service       // ServiceStorage.serviceDataIndexes
	conns       map[string]*client
	pushTasks   map[svcKey]*pushTask
}

// runState is one Start..Stop period of the server.
type runState struct {
	ctx      context.Context
	cancel   context.CancelFunc
	gs       *grpc.Server
	glis     *trackingListener
	hlis     *trackingListener
	pushWake chan struct{}
	wg       sync.WaitGroup
}

// Start starts a server on 127.0.0.1, on a port P such that P and P+1000 are
// both free, and stops it (waiting for all its goroutines) when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s := &Server{
		tb:          tb,
		host:        "127.0.0.1",
		verbose:     os.Getenv("NACOSSERVER_VERBOSE") != "",
		pushDelay:   DefaultPushDelay,
		ackWait:     pushTimeout,
		services:    make(map[svcKey]*service),
		publishers:  make(map[svcKey]map[string]struct{}),
		subscribers: make(map[svcKey]map[string]struct{}),
		snapshots:   make(map[svcKey]model.Service),
		conns:       make(map[string]*client),
		pushTasks:   make(map[svcKey]*pushTask),
	}
	h, g, err := listenPair(s.host)
	if err != nil {
		tb.Fatalf("nacosserver: %v", err)
	}
	s.httpPort = h.Addr().(*net.TCPAddr).Port
	s.grpcPort = g.Addr().(*net.TCPAddr).Port
	s.startWith(h, g)
	tb.Cleanup(func() {
		s.lifeMu.Lock()
		defer s.lifeMu.Unlock()
		s.stopLocked()
		s.closed = true
	})
	return s
}

// Addr is the host:port the SDK must be configured with
// (constant.ServerConfig{IpAddr: Host(), Port: Port()}); the SDK adds 1000 to
// reach GRPCAddr.
func (s *Server) Addr() string { return net.JoinHostPort(s.host, strconv.Itoa(s.httpPort)) }

// GRPCAddr is the address of the gRPC listener: Addr's port + 1000.
func (s *Server) GRPCAddr() string { return net.JoinHostPort(s.host, strconv.Itoa(s.grpcPort)) }

// Host is the IP the server listens on (127.0.0.1).
func (s *Server) Host() string { return s.host }

// Port is Addr's port, the one to put in constant.ServerConfig.Port.
func (s *Server) Port() uint64 { return uint64(s.httpPort) }

// SetAddedMetadata makes the server add these metadata keys to every
// instance registered from now on, as servers that keep bookkeeping in the
// metadata do (Polaris' Nacos plugin adds internal-nacos-* keys).
func (s *Server) SetAddedMetadata(md map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addedMeta = maps.Clone(md)
}

// SetPushDelay sets the merge window between a change and its push (Nacos'
// nacos.naming.push.pushTaskDelay). The default is DefaultPushDelay, as in
// Nacos; 0 pushes at once.
func (s *Server) SetPushDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pushDelay = max(d, 0)
}

func (s *Server) startWith(h, g net.Listener) {
	r := &runState{
		glis:     newTrackingListener(g),
		hlis:     newTrackingListener(h),
		pushWake: make(chan struct{}, 1),
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.gs = grpc.NewServer(
		grpc.StatsHandler(connTagger{}),
		grpc.WaitForHandlers(true),
		grpc.MaxRecvMsgSize(maxInbound),
		// The SDK pings every 60 s (nacos.remote.grpc.keep.alive.millis) even
		// without streams; do not answer that with GOAWAY too_many_pings.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Second, PermitWithoutStream: true}),
	)
	pb.RegisterRequestServer(r.gs, &unaryService{s: s, r: r})
	pb.RegisterBiRequestStreamServer(r.gs, &streamService{s: s, r: r})

	s.mu.Lock()
	s.run = r
	if s.paused { // a restarted process is not frozen
		s.paused = false
		close(s.resumeCh)
	}
	s.mu.Unlock()

	r.wg.Add(3)
	go func() {
		defer r.wg.Done()
		_ = r.gs.Serve(r.glis)
	}()
	go s.serveHTTP(r)
	go s.pushLoop(r)
	s.logf("started on %s (gRPC %s)", s.Addr(), s.GRPCAddr())
}

// Start starts a stopped server again on the same ports, retrying for a while
// if a port is briefly unavailable. It does nothing if the server runs.
func (s *Server) Start() {
	s.tb.Helper()
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if s.closed {
		s.tb.Fatalf("nacosserver: Start after the test ended")
	}
	s.mu.Lock()
	running := s.run != nil
	s.mu.Unlock()
	if running {
		return
	}
	deadline := time.Now().Add(restartDeadline)
	for {
		h, errH := net.Listen("tcp", s.Addr())
		g, errG := net.Listen("tcp", s.GRPCAddr())
		if errH == nil && errG == nil {
			s.startWith(h, g)
			return
		}
		if h != nil {
			_ = h.Close()
		}
		if g != nil {
			_ = g.Close()
		}
		if time.Now().After(deadline) {
			s.tb.Fatalf("nacosserver: cannot listen again on %s/%s: %v", s.Addr(), s.GRPCAddr(), errors.Join(errH, errG))
		}
		time.Sleep(50 * time.Millisecond) // retrying a bind, not waiting for a condition of ours
	}
}

// Stop closes the listeners and every connection, as a stopped Nacos process
// does. Ephemeral instances die with their connections (subscribers are
// connections too, so nobody is told); injected instances and the services
// that hold them are kept. Stop waits for all the server's goroutines.
func (s *Server) Stop() {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	s.stopLocked()
}

func (s *Server) stopLocked() {
	s.mu.Lock()
	r := s.run
	s.run = nil
	s.mu.Unlock()
	if r == nil {
		return
	}
	r.cancel()
	_ = r.hlis.Close()
	r.hlis.closeConns(nil)
	r.gs.Stop() // closes r.glis and every transport, waits for the handlers
	r.wg.Wait()

	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns { // normally already gone with their streams
		s.unregisterLocked(c)
	}
	clear(s.pushTasks)
	clear(s.snapshots)
	for k, svc := range s.services {
		if len(svc.injected) == 0 {
			delete(s.services, k) // an ephemeral service does not survive a restart
		}
	}
	s.logf("stopped")
}

// Restart stops and starts the server on the same ports. With wipe, the data
// that Stop keeps (injected instances, their services) is dropped too, as if
// the server came back with an empty disk.
func (s *Server) Restart(wipe bool) {
	s.tb.Helper()
	s.Stop()
	if wipe {
		s.mu.Lock()
		clear(s.services)
		s.mu.Unlock()
	}
	s.Start()
}

// Pause freezes the server: requests, health checks and server checks hang
// until Resume, streams stay open but nothing is read from or written to them,
// pushes wait. To the SDK the server looks unreachable (its requests time out,
// its health check fails and it keeps trying to reconnect).
func (s *Server) Pause() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.paused {
		s.paused = true
		s.resumeCh = make(chan struct{})
		s.logf("paused")
	}
}

// Resume undoes Pause.
func (s *Server) Resume() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.paused {
		s.paused = false
		close(s.resumeCh)
		s.logf("resumed")
	}
}

// gate blocks while the server is paused. It fails when ctx ends or the run
// r is stopped.
func (s *Server) gate(ctx context.Context, r *runState) error {
	for {
		s.mu.Lock()
		paused, ch := s.paused, s.resumeCh
		s.mu.Unlock()
		if !paused {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-r.ctx.Done():
			return r.ctx.Err()
		}
	}
}

// DropConnections closes every client transport, as a server crash would,
// and keeps listening: the SDK reconnects and replays its registrations and
// subscriptions. Unless the server is paused it waits until the dropped
// connections are unregistered (their instances gone). It returns the number
// of transports closed.
func (s *Server) DropConnections() int {
	s.mu.Lock()
	r := s.run
	paused := s.paused
	var victims []*client
	for _, c := range s.conns {
		victims = append(victims, c)
	}
	s.mu.Unlock()
	if r == nil {
		return 0
	}
	n := r.glis.closeConns(nil)
	if !paused {
		waitClosed(victims, 5*time.Second)
	}
	s.logf("dropped %d connections", n)
	return n
}

// DropConnection closes the transport of one connection (see ConnectionIDs),
// like a client process that crashed. It reports whether the connection
// existed; unless the server is paused it waits until it is unregistered.
func (s *Server) DropConnection(id string) bool {
	s.mu.Lock()
	r, c, paused := s.run, s.conns[id], s.paused
	s.mu.Unlock()
	if r == nil || c == nil {
		return false
	}
	r.glis.closeConns(func(remote string) bool { return remote == c.remote })
	if !paused {
		waitClosed([]*client{c}, 5*time.Second)
	}
	return true
}

func waitClosed(cs []*client, timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for _, c := range cs {
		select {
		case <-c.done:
		case <-t.C:
			return
		}
	}
}

// ConnectionCount is the number of registered connections (those that sent
// ConnectionSetupRequest and whose stream is still open).
func (s *Server) ConnectionCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// ConnectionIDs lists the registered connection ids, sorted.
func (s *Server) ConnectionIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.conns))
	for id := range s.conns {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// PendingPushes is the number of pushes of a service that are scheduled or
// sent and not yet acknowledged (Empty namespace and group mean "public" and
// "DEFAULT_GROUP"). The SDK acknowledges a NotifySubscriberRequest after it
// has processed it (ServiceInfoHolder.ProcessService, callbacks included), so
// 0 means every subscriber has applied every push of the service.
func (s *Server) PendingPushes(namespace, group, service string) int {
	k := helperKey(namespace, group, service)
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	if _, ok := s.pushTasks[k]; ok {
		n++
	}
	for _, c := range s.conns {
		for _, a := range c.acks {
			if a.push != nil && *a.push == k {
				n++
			}
		}
	}
	return n
}

// Instances returns every instance of a service as ServiceStorage would build
// it now (disabled and unhealthy ones included), sorted by ip, port, cluster.
// Empty namespace and group mean "public" and "DEFAULT_GROUP".
// Writes counts the register requests a service received.
type Writes struct {
	Requests  int // registerInstance and batchRegisterInstance requests handled
	Instances int // instances they carried
	Unchanged int // requests that left the connection's publication as it was (resends)
}

// Writes returns the register requests service has received since the
// server was made (restarts included).
func (s *Server) Writes(namespace, group, service string) Writes {
	k := helperKey(namespace, group, service)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes[k]
}

// wroteLocked counts a register request to k that publishes insts over
// what the connection published before.
func (s *Server) wroteLocked(k svcKey, insts, before []model.Instance) {
	if s.writes == nil {
		s.writes = map[svcKey]Writes{}
	}
	w := s.writes[k]
	w.Requests++
	w.Instances += len(insts)
	if before != nil && len(before) == len(insts) {
		same := true
		for _, in := range insts {
			if !slices.ContainsFunc(before, func(b model.Instance) bool { return reflect.DeepEqual(b, in) }) {
				same = false
				break
			}
		}
		if same {
			w.Unchanged++
		}
	}
	s.writes[k] = w
}

func (s *Server) Instances(namespace, group, service string) []model.Instance {
	k := helperKey(namespace, group, service)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.instancesLocked(k)
}

// Subscribers is the number of connections subscribed to a service.
func (s *Server) Subscribers(namespace, group, service string) int {
	k := helperKey(namespace, group, service)
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.subscribers[k])
}

// Inject writes an instance straight into a service, as a foreign writer
// would (another SDK, the admin API), and pushes the change to subscribers.
// The instance is stored verbatim, malformed or not (empty IP, port 0, ...);
// note that pushes leave out instances with Enable false, as Nacos does. An
// injected instance replaces an earlier one with the same IP, port and
// cluster; it belongs to no connection and survives Stop (not Restart(true)).
// Empty namespace and group mean "public" and "DEFAULT_GROUP".
func (s *Server) Inject(namespace, group, service string, inst model.Instance) {
	k := helperKey(namespace, group, service)
	inst = copyInstance(inst)
	s.mu.Lock()
	defer s.mu.Unlock()
	svc := s.ensureServiceLocked(k)
	replaced := false
	for i, old := range svc.injected {
		if old.Ip == inst.Ip && old.Port == inst.Port && old.ClusterName == inst.ClusterName {
			svc.injected[i] = inst
			replaced = true
			break
		}
	}
	if !replaced {
		svc.injected = append(svc.injected, inst)
	}
	s.changedLocked(k)
}

// RemoveInjected removes the injected instances of a service with this IP and
// port (any cluster) and reports how many it removed.
func (s *Server) RemoveInjected(namespace, group, service, ip string, port uint64) int {
	k := helperKey(namespace, group, service)
	s.mu.Lock()
	defer s.mu.Unlock()
	svc := s.services[k]
	if svc == nil {
		return 0
	}
	n := 0
	kept := svc.injected[:0]
	for _, inst := range svc.injected {
		if inst.Ip == ip && inst.Port == port {
			n++
			continue
		}
		kept = append(kept, inst)
	}
	svc.injected = kept
	if n > 0 {
		s.changedLocked(k)
	}
	return n
}

func helperKey(namespace, group, service string) svcKey {
	if namespace == "" {
		namespace = "public"
	}
	if group == "" {
		group = "DEFAULT_GROUP"
	}
	return svcKey{ns: namespace, group: group, name: service}
}

func (s *Server) logf(format string, args ...any) {
	if s.verbose {
		s.tb.Logf("nacosserver %s: %s", s.Addr(), fmt.Sprintf(format, args...))
	}
}
