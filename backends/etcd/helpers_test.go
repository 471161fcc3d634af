package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/rollcall-go/rollcall/registry"
)

// logs records every log line, for tests that assert what was (or was not)
// logged. Lines are also written to stderr when -v is given.
type logs struct {
	mu    sync.Mutex
	lines []logLine
}

type logLine struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (l logLine) String() string { return fmt.Sprintf("%s %s %v", l.level, l.msg, l.attrs) }

func newLogs() (*logs, *slog.Logger) {
	l := &logs{}
	return l, slog.New(l)
}

func (l *logs) Enabled(context.Context, slog.Level) bool { return true }

func (l *logs) Handle(_ context.Context, r slog.Record) error {
	line := logLine{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	r.Attrs(func(a slog.Attr) bool {
		line.attrs[a.Key] = a.Value.String()
		return true
	})
	if testingVerbose() {
		fmt.Fprintf(os.Stderr, "log: %s\n", line)
	}
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	return nil
}

func (l *logs) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logs) WithGroup(string) slog.Handler      { return l }

// find returns the lines at level or above whose message contains substr.
func (l *logs) find(level slog.Level, substr string) []logLine {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []logLine
	for _, line := range l.lines {
		if line.level >= level && strings.Contains(line.msg, substr) {
			out = append(out, line)
		}
	}
	return out
}

func testingVerbose() bool { return testing.Verbose() }

// recorder reads a Watcher in the background and keeps every update.
type recorder struct {
	mu      sync.Mutex
	updates []registry.Update
	err     error
	done    chan struct{}
	cancel  context.CancelFunc
}

func record(t *testing.T, w *registry.Watcher) *recorder {
	ctx, cancel := context.WithCancel(context.Background())
	rec := &recorder{done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(rec.done)
		for {
			u, err := w.Next(ctx)
			rec.mu.Lock()
			if err != nil {
				rec.err = err
				rec.mu.Unlock()
				return
			}
			rec.updates = append(rec.updates, u)
			rec.mu.Unlock()
		}
	}()
	t.Cleanup(rec.stop)
	return rec
}

func (r *recorder) stop() { r.cancel(); <-r.done }

// all returns the updates so far.
func (r *recorder) all() []registry.Update {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]registry.Update(nil), r.updates...)
}

// last returns the latest update, if any.
func (r *recorder) last() (registry.Update, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.updates) == 0 {
		return registry.Update{}, false
	}
	return r.updates[len(r.updates)-1], true
}

func ids(u registry.Update) []string {
	var out []string
	for _, in := range u.Instances() {
		out = append(out, in.ID)
	}
	return out
}

func describe(us []registry.Update) string {
	var b strings.Builder
	for i, u := range us {
		fmt.Fprintf(&b, "  #%d stale=%v synced=%v ids=%v err=%v\n", i, u.Stale, u.Synced, ids(u), u.Err)
	}
	return b.String()
}

// countPuts watches key from now on through cli and counts the PUT events
// it sees; the returned function stops the watch and gives the count.
func countPuts(t *testing.T, cli *clientv3.Client, key string) func() int {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	wch := cli.Watch(ctx, key, clientv3.WithCreatedNotify())
	if resp := <-wch; !resp.Created {
		cancel()
		t.Fatalf("watch of %s not created: %v", key, resp.Err())
	}
	var mu sync.Mutex
	n := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range wch {
			for _, ev := range resp.Events {
				if ev.Type == mvccpb.PUT {
					mu.Lock()
					n++
					mu.Unlock()
				}
			}
		}
	}()
	stopped := false
	stop := func() int {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
		mu.Lock()
		defer mu.Unlock()
		return n
	}
	t.Cleanup(func() { stop() })
	return stop
}

// enableAuth turns on authentication on the etcd at ep: a root user, and a
// user "nobody" whose only role may read and write "/elsewhere/", nothing
// under the registry's prefix.
func enableAuth(t *testing.T, ep, rootPassword, nobodyPassword string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := newClient(t, ep)
	defer admin.Close()
	for _, step := range []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", rootPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "elsewhere"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "elsewhere", "/elsewhere/", clientv3.GetPrefixRangeEnd("/elsewhere/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserAdd(ctx, "nobody", nobodyPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "nobody", "elsewhere"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatalf("enabling auth: %v", err)
		}
	}
}

// bounded runs fn in a goroutine and returns its error and how long it
// took; if fn has not returned within limit (a hang guard, not a timing
// assertion), the test fails, after unblock has been called and fn has
// returned.
func bounded(t *testing.T, what string, limit time.Duration, unblock func(), fn func() error) (error, time.Duration) {
	t.Helper()
	type result struct {
		err  error
		took time.Duration
	}
	ch := make(chan result, 1)
	start := time.Now()
	go func() {
		err := fn()
		ch <- result{err, time.Since(start)}
	}()
	select {
	case r := <-ch:
		return r.err, r.took
	case <-time.After(limit):
	}
	if unblock != nil {
		unblock()
	}
	select {
	case r := <-ch:
		t.Fatalf("%s did not return within %v (returned %v after %v once unblocked)", what, limit, r.err, r.took.Round(time.Millisecond))
	case <-time.After(time.Minute):
		t.Fatalf("%s did not return within %v, nor a minute after being unblocked", what, limit)
	}
	return nil, 0
}

// newFaultyRevokeClient is a client whose first LeaseRevoke call fails on
// the client side (the server is real; the call is cut short, as a timeout
// would): a client interceptor returns an error instead of sending it.
func newFaultyRevokeClient(t testing.TB, ep string) *clientv3.Client {
	t.Helper()
	var failed atomic.Bool
	cfg := clientConfig(ep)
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if method == "/etcdserverpb.Lease/LeaseRevoke" && failed.CompareAndSwap(false, true) {
				return errors.New("test: LeaseRevoke cut short")
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cli
}
