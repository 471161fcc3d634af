package consul

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/rollcall-go/rollcall/registry/driver"
)

var errStreamClosed = errors.New("consul: watch closed")

// Pauses after a blocking query that returned early without progress (same
// index, or an index that went backwards): growing from minPause, at most
// the wait time.
const minPause = 250 * time.Millisecond

// stream is a watch of one service: a loop of blocking health queries, run
// by Next in the caller's goroutine. It is used by one goroutine at a time;
// Close may be called from any.
type stream struct {
	b       *backend
	service string
	ctx     context.Context // canceled by Close and by the backend's Close
	cancel  context.CancelFunc

	index  uint64            // X-Consul-Index to block on; 0: do not block
	sent   bool              // the first event was returned
	last   []driver.Instance // the list last returned
	stalls int               // consecutive early returns without progress
	pause  time.Duration     // to wait before the next query
	warned bool              // about instances hidden by ACLs
}

// Next returns the full list of passing instances as a Reset event, the
// first time at once, then whenever it changes. It fails when a query fails
// or is not answered within the wait time plus a margin.
func (s *stream) Next(ctx context.Context) (driver.Event, error) {
	for {
		if s.ctx.Err() != nil {
			return driver.Event{}, errStreamClosed
		}
		if s.pause > 0 {
			if err := s.sleep(ctx, s.pause); err != nil {
				return driver.Event{}, err
			}
		}
		start := time.Now()
		entries, meta, err := s.b.health(ctx, s.ctx, s.service, s.index)
		if err != nil {
			return driver.Event{}, err
		}
		if meta.ResultsFilteredByACLs && !s.warned {
			s.warned = true
			s.b.log.Warn("consul: the ACL token may not read every instance; watching those it may read", "service", s.service)
		}
		// Consul's index rules: never block on an index below 1 (it would
		// return at once, forever); when the index goes backwards (a
		// restarted or replaced server, or a streaming view that lost its
		// subscription: it answers an empty list at index 1 to a token the
		// servers no longer know), the answer is not trusted: read again
		// from index 0, which the agent answers from the servers at once.
		prev, idx := s.index, max(meta.LastIndex, 1)
		// Rate limit: a blocking query that returns early without progress
		// (same index, or backwards) is followed by a growing pause; one
		// that made progress or waited its time ends it. Queries from
		// index 0 return at once by design and change neither.
		if prev != 0 {
			if idx <= prev && time.Since(start) < s.b.wait/2 {
				s.stalls++
				d := min(s.b.wait, minPause<<min(s.stalls-1, 10))
				s.pause = d/2 + rand.N(d/2+1)
			} else {
				s.stalls, s.pause = 0, 0
			}
		}
		if idx < prev {
			s.index = 0
			continue
		}
		s.index = idx
		// The list is compared even when the index did not move: an agent
		// that gets its index wrong still cannot hide a change.
		list := s.b.convert(entries)
		if s.sent && sameInstances(list, s.last) {
			continue
		}
		if len(list) == 0 {
			// Never deliver a refusal as an empty list.
			if err := s.b.mayRead(ctx, s.ctx, s.service); err != nil {
				return driver.Event{}, err
			}
		}
		s.sent, s.last = true, list
		return driver.ResetEvent(list), nil
	}
}

func (s *stream) sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.ctx.Done():
		return errStreamClosed
	}
}

// Close ends the watch: a query in flight is canceled, which closes its
// connection, so the agent stops waiting on it.
func (s *stream) Close() error {
	s.cancel()
	return nil
}
