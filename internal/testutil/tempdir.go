package testutil

import (
	"os"
	"testing"
	"time"
)

// TempDir is t.TempDir for a directory that something the test cannot stop
// at once may still write to while the test ends: nacos-sdk-go writes its
// service cache from push handlers that its CloseClient does not wait for,
// so testing's own removal can fail with "directory not empty". The
// directory is removed at cleanup, trying again for up to 10 s.
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rollcall-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.RemoveAll(dir)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("removing %s: %v", dir, err)
				return
			}
			time.Sleep(PollInterval)
		}
	})
	return dir
}
