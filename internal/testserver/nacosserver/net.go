package nacosserver

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/stats"
)

// trackingListener remembers every connection it accepted so that the server
// can cut them (DropConnections, a connection whose client stopped answering)
// without stopping the gRPC server.
type trackingListener struct {
	net.Listener

	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool
}

func newTrackingListener(l net.Listener) *trackingListener {
	return &trackingListener{Listener: l, conns: make(map[*trackedConn]struct{})}
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, l: l}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	l.conns[tc] = struct{}{}
	return tc, nil
}

func (l *trackingListener) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return l.Listener.Close()
}

// closeConns closes the accepted connections whose remote address matches
// (all of them when match is nil) and reports how many it closed.
func (l *trackingListener) closeConns(match func(remote string) bool) int {
	l.mu.Lock()
	var victims []*trackedConn
	for c := range l.conns {
		if match == nil || match(c.RemoteAddr().String()) {
			victims = append(victims, c)
		}
	}
	l.mu.Unlock()
	for _, c := range victims {
		_ = c.Close()
	}
	return len(victims)
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// connTagger gives every gRPC transport its Nacos connection id. Nacos does
// the same in a transport filter (GrpcServer#transportReady, key
// CONTEXT_KEY_CONN_ID): the id is "<currentTimeMillis>_<remoteIp>_<remotePort>",
// shared by the unary calls (ServerCheckRequest returns it) and the bi-stream
// opened on the same transport.
type connTagger struct{}

type connInfoKey struct{}

type connInfo struct {
	id     string
	remote string
}

func (connTagger) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	remote := info.RemoteAddr.String()
	host, port, err := net.SplitHostPort(remote)
	if err != nil {
		host, port = remote, "0"
	}
	id := fmt.Sprintf("%d_%s_%s", time.Now().UnixMilli(), host, port)
	return context.WithValue(ctx, connInfoKey{}, &connInfo{id: id, remote: remote})
}

func (connTagger) HandleConn(context.Context, stats.ConnStats)                     {}
func (connTagger) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTagger) HandleRPC(context.Context, stats.RPCStats)                       {}

func connInfoFrom(ctx context.Context) *connInfo {
	if ci, ok := ctx.Value(connInfoKey{}).(*connInfo); ok {
		return ci
	}
	return &connInfo{id: "unknown", remote: "unknown"}
}

// httpNotImplemented is what the HTTP port answers. The SDK only goes there
// for what the gRPC protocol does not carry: persistent instances
// (Ephemeral=false routes RegisterInstance/DeregisterInstance to
// naming_http.NamingHttpProxy, see NamingProxyDelegate.getExecuteClientProxy)
// and the ServerHealthy fallback.
const httpNotImplemented = "nacosserver: only the Nacos 2.x gRPC naming protocol is implemented; " +
	"the HTTP API is not (the SDK uses it for persistent instances, i.e. Ephemeral=false)\n"

// serveHTTP holds the HTTP port (Addr) and answers every request with 501.
// It is a hand-written HTTP/1 responder so that every goroutine is owned.
func (s *Server) serveHTTP(r *runState) {
	defer r.wg.Done()
	for {
		c, err := r.hlis.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go s.handleHTTPConn(r, c)
	}
}

func (s *Server) handleHTTPConn(r *runState, c net.Conn) {
	defer r.wg.Done()
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		_ = req.Body.Close()
		if s.gate(r.ctx, r) != nil {
			return
		}
		s.logf("HTTP %s %s -> 501", req.Method, req.URL)
		resp := &http.Response{
			StatusCode:    http.StatusNotImplemented,
			ProtoMajor:    1,
			ProtoMinor:    1,
			Header:        http.Header{"Content-Type": {"text/plain; charset=utf-8"}},
			Body:          io.NopCloser(strings.NewReader(httpNotImplemented)),
			ContentLength: int64(len(httpNotImplemented)),
		}
		if err := resp.Write(c); err != nil {
			return
		}
	}
}

// listenPair finds a port P such that P (HTTP) and P+1000 (gRPC) are both
// free on host and returns listeners on both.
func listenPair(host string) (httpL, grpcL net.Listener, err error) {
	for range 200 {
		g, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, nil, err
		}
		gp := g.Addr().(*net.TCPAddr).Port
		if gp-1000 < 1024 {
			_ = g.Close()
			continue
		}
		h, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(gp-1000)))
		if err != nil {
			_ = g.Close()
			continue
		}
		return h, g, nil
	}
	return nil, nil, fmt.Errorf("no free port pair P, P+1000 on %s", host)
}
