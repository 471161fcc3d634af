package etcd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Reasons a watch ends.
var (
	ErrStalled       = errors.New("etcd: watch stopped answering progress requests")
	ErrRevisionReset = errors.New("etcd: server revision went backwards (data lost or a different cluster)")
)

type stream struct {
	b       *backend
	service string
	dir     string
	ctx     context.Context // carries the require-leader metadata of the watch stream
	cancel  context.CancelFunc
	wch     clientv3.WatchChan
	first   *driver.Event
	rev     int64
	ticker  *time.Ticker
	asked   time.Time // when the unanswered progress request was sent; zero if none
}

// Watch lists the service, then watches it from the listed revision + 1.
func (b *backend) Watch(ctx context.Context, service string) (driver.Stream, error) {
	list, rev, err := b.list(ctx, service)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(b.ctx)) // ctx bounds only the list above
	s := &stream{b: b, service: service, dir: b.dir(service), ctx: wctx, cancel: cancel, rev: rev,
		first: &driver.Event{Reset: true, Instances: list}}
	s.wch = b.cli.Watch(wctx, s.dir, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	s.ticker = time.NewTicker(b.opts.ProgressInterval)
	return s, nil
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
		case <-s.ticker.C:
			if !s.asked.IsZero() {
				if time.Since(s.asked) >= s.b.opts.ProgressTimeout {
					return driver.Event{}, unavailable(ErrStalled)
				}
				continue
			}
			s.asked = time.Now()
			// The answer arrives on the watch channel as a progress
			// notification. Sending blocks while the client reconnects;
			// the same context keeps it on this watch's stream.
			rctx, cancel := context.WithTimeout(s.ctx, s.b.opts.ProgressTimeout)
			err := s.b.cli.RequestProgress(rctx)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return driver.Event{}, ctx.Err()
				}
				if errors.Is(err, context.DeadlineExceeded) {
					err = ErrStalled
				}
				return driver.Event{}, unavailable(err)
			}
		case resp, ok := <-s.wch:
			if !ok {
				if err := ctx.Err(); err != nil {
					return driver.Event{}, err
				}
				return driver.Event{}, unavailable(errors.New("etcd: watch channel closed"))
			}
			if err := resp.Err(); err != nil {
				// Compacted, canceled, or no leader: the caller relists.
				return driver.Event{}, unavailable(err)
			}
			s.asked = time.Time{}
			if resp.Header.Revision < s.rev {
				return driver.Event{}, unavailable(fmt.Errorf("%w: at %d, had seen %d", ErrRevisionReset, resp.Header.Revision, s.rev))
			}
			s.rev = resp.Header.Revision
			if len(resp.Events) == 0 {
				continue // progress notification
			}
			if ev, ok := s.convert(resp.Events); ok {
				return ev, nil
			}
		}
	}
}

func (s *stream) convert(evs []*clientv3.Event) (driver.Event, bool) {
	var out driver.Event
	for _, e := range evs {
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
	s.cancel()
	s.ticker.Stop()
	return nil
}
