package etcd

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Reasons a watch ends.
var (
	ErrStalled       = errors.New("etcd: watch stopped answering progress requests")
	ErrRevisionReset = errors.New("etcd: server revision went backwards (data lost or a different cluster)")
)

// streamMD is the gRPC metadata key that puts a watch on a gRPC stream of
// its own. clientv3 puts every watch whose context carries the same
// outgoing metadata on one stream, and etcd answers a progress request on
// a stream only if every watch on it is in sync and starts at or before the
// current revision (watchableStore.progressIfSync): one watch resumed past
// it by clientv3 would leave the others unanswered.
const streamMD = "rollcall-stream"

func (b *backend) withStream(ctx context.Context, name string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, streamMD, name)
}

// takeStream returns a stream name no watch uses, reusing released ones, so
// that a watch that clientv3 could not open (its stream lingers until it
// connects) does not leave one stream behind per attempt.
func (b *backend) takeStream() string {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	if n := len(b.freeStreams); n > 0 {
		name := b.freeStreams[n-1]
		b.freeStreams = b.freeStreams[:n-1]
		return name
	}
	b.nStreams++
	return "watch-" + strconv.Itoa(b.nStreams)
}

func (b *backend) releaseStream(name string) {
	b.streamsMu.Lock()
	b.freeStreams = append(b.freeStreams, name)
	b.streamsMu.Unlock()
}

type stream struct {
	b       *backend
	service string
	dir     string
	ctx     context.Context // the stream's life, from the backend's; ended by Close
	cancel  context.CancelFunc
	first   *driver.Event
	timer   *time.Timer // idle: ask for progress; asked: the answer is late
	asked   bool        // a progress request is unanswered
	rev     int64       // the highest revision the server reported
	once    sync.Once

	// The current etcd watch.
	name    string // its gRPC stream
	wctx    context.Context
	wcancel context.CancelFunc
	wch     clientv3.WatchChan
	start   int64 // the revision it starts at, that of the list: its events up to there are in the list
}

// Watch lists the service, then watches it from the listed revision. ctx
// bounds listing and opening the watch only; the stream lives until Close.
func (b *backend) Watch(ctx context.Context, service string) (driver.Stream, error) {
	list, rev, err := b.list(ctx, service)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(b.ctx)
	s := &stream{b: b, service: service, dir: b.dir(service), ctx: sctx, cancel: cancel, rev: rev}
	if err := s.open(ctx, rev); err != nil {
		cancel()
		return nil, err
	}
	ev := driver.ResetEvent(list)
	s.first = &ev
	s.timer = time.NewTimer(b.opts.ProgressInterval)
	return s, nil
}

// open starts a new etcd watch of the directory from rev, on a gRPC stream
// of its own, and ends the previous one. ctx bounds opening it (clientv3's
// Watch waits until the server has created it).
func (s *stream) open(ctx context.Context, rev int64) error {
	name := s.b.takeStream()
	wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(s.b.withStream(s.ctx, name)))
	stop := context.AfterFunc(ctx, wcancel)
	wch := s.b.cli.Watch(wctx, s.dir, clientv3.WithPrefix(), clientv3.WithRev(rev))
	if !stop() {
		wcancel()
		s.b.releaseStream(name)
		return fmt.Errorf("etcd: opening the watch of %s: %w", s.dir, ctx.Err())
	}
	if s.wcancel != nil {
		s.wcancel()
		s.b.releaseStream(s.name)
	}
	s.name, s.wctx, s.wcancel, s.wch, s.start = name, wctx, wcancel, wch, rev
	return nil
}

func (s *stream) Next(ctx context.Context) (driver.Event, error) {
	if s.first != nil {
		ev := *s.first
		s.first = nil
		return ev, nil
	}
	for {
		select {
		case <-ctx.Done():
			return driver.Event{}, ctx.Err()
		case <-s.timer.C:
			if !s.asked {
				s.asked = true
				s.timer.Reset(s.b.opts.ProgressTimeout)
				// The answer arrives on the watch channel as a progress
				// notification. Sending blocks while the client
				// reconnects; the watch's context names its stream.
				rctx, cancel := context.WithTimeout(s.wctx, s.b.opts.ProgressTimeout)
				stop := context.AfterFunc(ctx, cancel)
				err := s.b.cli.RequestProgress(rctx)
				stop()
				cancel()
				if err == nil {
					continue
				}
				if ctx.Err() != nil {
					return driver.Event{}, ctx.Err()
				}
				// Not even sent: check the server at once.
			}
			return s.resync(ctx)
		case resp, ok := <-s.wch:
			if !ok {
				if err := ctx.Err(); err != nil {
					return driver.Event{}, err
				}
				return driver.Event{}, classify(errors.New("etcd: watch channel closed"))
			}
			if err := resp.Err(); err != nil {
				// Compacted, canceled, no leader, no permission: the
				// caller relists.
				return driver.Event{}, classify(err)
			}
			s.asked = false
			s.timer.Reset(s.b.opts.ProgressInterval)
			if resp.Header.Revision < s.rev {
				return driver.Event{}, classify(fmt.Errorf("%w: at %d, had seen %d", ErrRevisionReset, resp.Header.Revision, s.rev))
			}
			s.rev = resp.Header.Revision
			if resp.IsProgressNotify() {
				s.b.progressed.Add(1)
			}
			if ev, ok := s.convert(resp.Events); ok {
				return ev, nil
			}
		}
	}
}

// resync handles a progress request left unanswered: it lists the service
// again, within ProgressTimeout. A list that fails means a frozen or
// unreachable server, and one at a revision below what the server reported
// before means its data was lost: the watch ends. Otherwise the server is
// healthy and the watch was not in sync (clientv3 resumed it after a
// reconnection from past the current revision, or it was catching up):
// the list is delivered as a Reset and the watch starts again from it.
func (s *stream) resync(ctx context.Context) (driver.Event, error) {
	timeout := s.b.opts.ProgressTimeout
	lctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stalled := func(err error) (driver.Event, error) {
		if ctx.Err() != nil {
			return driver.Event{}, ctx.Err()
		}
		if errors.Is(err, registry.ErrPermission) {
			return driver.Event{}, err
		}
		return driver.Event{}, fmt.Errorf("%w: %w: no progress notification within %v, and listing the service again: %v", registry.ErrUnavailable, ErrStalled, timeout, err)
	}
	list, rev, err := s.b.list(lctx, s.service)
	if err != nil {
		return stalled(err)
	}
	if rev < s.rev {
		return driver.Event{}, classify(fmt.Errorf("%w: at %d, had seen %d", ErrRevisionReset, rev, s.rev))
	}
	if err := s.open(lctx, rev); err != nil {
		return stalled(err)
	}
	s.rev = rev
	s.asked = false
	s.timer.Reset(s.b.opts.ProgressInterval)
	s.b.log.Info("etcd: a watch did not answer a progress request, the server did: listed again, watching from there",
		"service", s.service, "revision", rev)
	return driver.ResetEvent(list), nil
}

// convert turns a watch response's events into changes, in the server's
// order, leaving out those of revisions the list already holds.
func (s *stream) convert(evs []*clientv3.Event) (driver.Event, bool) {
	var out driver.Event
	for _, e := range evs {
		if e.Kv.ModRevision <= s.start {
			continue
		}
		switch e.Type {
		case mvccpb.PUT:
			in, ok := s.b.decode(s.service, s.dir, e.Kv.Key, e.Kv.Value)
			switch {
			case ok:
				out.Changes = append(out.Changes, driver.Put(in))
			case in.ID != "":
				out.Changes = append(out.Changes, driver.Delete(in.ID)) // overwritten by garbage
			}
		case mvccpb.DELETE:
			if id := strings.TrimPrefix(string(e.Kv.Key), s.dir); id != "" && !strings.Contains(id, "/") {
				out.Changes = append(out.Changes, driver.Delete(id))
			}
		}
	}
	// In the server's order: a DELETE and a PUT of one key in one response
	// (lease expired, then registered again) leave the instance present.
	return out, len(out.Changes) > 0
}

// Close cancels the watch on the server (clientv3 sends a cancel request
// when the watch's context ends).
func (s *stream) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.timer.Stop()
		s.wcancel()
		s.b.releaseStream(s.name)
	})
	return nil
}
