// Package testutil holds what the project's tests share.
package testutil

import (
	"testing"
	"time"
)

// PollInterval is how often WaitFor checks its condition.
const PollInterval = 10 * time.Millisecond

// WaitFor polls cond until it holds, and fails the test if it does not within
// timeout. It returns how long the wait took. Tests wait for conditions with
// it instead of sleeping.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(PollInterval) // the polling interval, not synchronisation
	}
	return time.Since(start)
}
