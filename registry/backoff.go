package registry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is a capped exponential backoff with full jitter.
type Backoff struct {
	Min, Max time.Duration
}

func (b Backoff) withDefaults() Backoff {
	if b.Min <= 0 {
		b.Min = 100 * time.Millisecond
	}
	if b.Max < b.Min {
		b.Max = max(10*time.Second, b.Min)
	}
	return b
}

// maxAttempt is an attempt number whose Delay is always about Max.
const maxAttempt = 64

// Delay returns the wait before retry number attempt (0-based): a random
// duration between half and all of min(Max, Min*2^attempt).
func (b Backoff) Delay(attempt int) time.Duration {
	b = b.withDefaults()
	d := b.Max
	if attempt < 32 {
		if e := b.Min << attempt; e > 0 && e < b.Max {
			d = e
		}
	}
	return d/2 + rand.N(d/2+1)
}

// sleepCtx waits d or until ctx is done, and reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
