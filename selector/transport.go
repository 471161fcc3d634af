package selector

import (
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultAttempts is how many instances Transport tries for one request.
const DefaultAttempts = 3

// SkipAfterFailure is how long Transport sends no new request to an
// instance it could not reach, while other instances are left.
const SkipAfterFailure = 10 * time.Second

// Transport is an http.RoundTripper that sends a request whose URL host is
// the service name of one of its Pickers (http://user.rpc/users/42) to an
// instance that Picker picks, through the wrapped transport; requests for
// other hosts go to the wrapped transport unchanged. The request's Host
// header stays the service name (unless the request sets its own).
//
// When an instance cannot be reached (the connection is refused or breaks
// before a response), Transport tries another instance, up to
// DefaultAttempts in all: any request whose dial failed (nothing was sent),
// and an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE, or one
// with an Idempotency-Key header) whose connection broke. A request with a
// body is tried again only if it has GetBody (http.NewRequest sets it for
// the usual bodies). Responses, whatever their status, are returned as
// they are. Errors of Pick (ErrNoInstances, ErrClosed, the registry's) are
// returned at once.
//
// An instance that could not be reached gets no new request for
// SkipAfterFailure (unless every instance is in that case), so that an
// instance that went away costs one failed connection, not one per request
// until the registry drops it; the first request it answers ends that.
//
// For https, the wrapped transport verifies the instance's certificate
// against the instance's address; set its TLSClientConfig.ServerName to
// the name the certificates carry.
//
// Transport is safe for concurrent use. It does not close its Pickers.
type Transport struct {
	base    http.RoundTripper
	pickers map[string]*Picker

	nskip atomic.Int32 // len(skip), read without mu
	mu    sync.Mutex
	skip  map[string]time.Time // address → until when it gets no new request
}

var _ http.RoundTripper = (*Transport)(nil)

// NewTransport returns a Transport over base (http.DefaultTransport when
// nil) for the services of pickers, each by its Service name.
func NewTransport(base http.RoundTripper, pickers ...*Picker) *Transport {
	if base == nil {
		base = http.DefaultTransport
	}
	t := &Transport{base: base, pickers: make(map[string]*Picker, len(pickers)), skip: map[string]time.Time{}}
	for _, p := range pickers {
		t.pickers[p.Service()] = p
	}
	return t
}

// RoundTrip sends req to an instance of the service its URL names, or to
// the wrapped transport for another host.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	p := t.pickers[req.URL.Host]
	if p == nil {
		return t.base.RoundTrip(req)
	}
	ctx := req.Context()
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	var (
		tried   []string
		lastErr error
	)
	skipped := t.skipped()
	for attempt := 1; ; attempt++ {
		in, ok, err := p.pickExcept(ctx, append(tried, skipped...))
		if err == nil && !ok && skipped != nil {
			skipped = nil // every instance left is skipped: try them anyway
			in, ok, err = p.pickExcept(ctx, tried)
		}
		if err == nil && !ok {
			return nil, lastErr // every instance tried
		}
		if err != nil {
			if req.Body != nil && attempt == 1 {
				req.Body.Close() // a RoundTripper closes the body, also on errors
			}
			return nil, err
		}
		// A shallow copy, as Request.WithContext makes: only the URL and
		// Host differ, the headers are shared and not written.
		out, u := *req, *req.URL
		u.Host, out.URL = in.Addr, &u
		if out.Host == "" {
			out.Host = req.URL.Host
		}
		if attempt > 1 && req.GetBody != nil {
			if out.Body, err = req.GetBody(); err != nil {
				return nil, err
			}
		}
		resp, err := t.base.RoundTrip(&out)
		if err == nil {
			t.reached(in.Addr)
			return resp, nil
		}
		if connectionError(err) && ctx.Err() == nil { // not the caller giving up
			t.unreachable(in.Addr)
		}
		tried, lastErr = append(tried, in.Addr), err
		if attempt >= DefaultAttempts || !replayable || ctx.Err() != nil || !retryable(req, err) {
			return nil, err
		}
	}
}

// skipped returns the addresses that get no new request now.
func (t *Transport) skipped() []string {
	if t.nskip.Load() == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	var out []string
	for addr, until := range t.skip {
		if now.Before(until) {
			out = append(out, addr)
		} else {
			delete(t.skip, addr)
		}
	}
	t.nskip.Store(int32(len(t.skip)))
	return out
}

func (t *Transport) unreachable(addr string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.skip[addr] = time.Now().Add(SkipAfterFailure)
	t.nskip.Store(int32(len(t.skip)))
}

func (t *Transport) reached(addr string) {
	if t.nskip.Load() == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.skip, addr)
	t.nskip.Store(int32(len(t.skip)))
}

// connectionError reports whether err says the connection to the instance
// failed or broke (not the request's context, not the response).
func connectionError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// retryable reports whether err says the instance could not be reached and
// req may go to another one: a failed dial sent nothing; a connection that
// broke before the response may have delivered an idempotent request only.
func retryable(req *http.Request, err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return idempotent(req) && connectionError(err)
}

func idempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	_, key := req.Header["Idempotency-Key"]
	_, xkey := req.Header["X-Idempotency-Key"]
	return key || xkey
}
